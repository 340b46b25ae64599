"""Open Inference Protocol (KServe v2 REST) over the tiny model, through FastAPI's TestClient: JSON bodies and the
binary tensor data extension. Binary requests are encoded, and every response decoded, by tritonclient's own code
(``InferInput``, ``generate_request_body``, ``InferResult``), not by a codec of the test's: a wire format the test
wrote itself would pass on a mistake it shares with the server. Only malformed bodies are written by hand (the real
tritonclient talks to a real server in tests/e2e/test_kserve_tritonclient.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import zlib
from collections import Counter
from importlib.metadata import version

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import b64, png_of_size, scrape, value
from tritonclient.utils import serialize_byte_tensor

INFER = "/v2/models/shapes/infer"
OUTPUTS = [
    "label", "probabilities", "expert", "decided_by", "importance", "modality_weights", "madds", "saved_ratio",
    "operating_point", "degraded", "guarded", "uncertain", "uncertain_reason",
]  # fmt: skip


def binary_request(
    inputs: dict[str, list[bytes]], outputs: list[tuple[str, bool]] | None = None, parameters=None, request_id=""
) -> dict:
    """httpx.post kwargs: the request as tritonclient encodes it, every input as binary tensor data. ``outputs``:
    (name, binary) pairs; none asks for every output in binary (tritonclient's default)."""
    tensors = [
        triton.InferInput(name, [len(elements)], "BYTES").set_data_from_numpy(
            np.array(elements, dtype=np.object_), binary_data=True
        )
        for name, elements in inputs.items()
    ]
    requested = [triton.InferRequestedOutput(name, binary_data=binary) for name, binary in outputs or ()]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        tensors, outputs=requested or None, request_id=request_id, parameters=parameters
    )
    assert json_size is not None  # binary data follows the JSON
    return {"content": body, "headers": {"Inference-Header-Content-Length": str(json_size)}}


def json_request(images: list[str] | None = None, texts: list[str] | None = None, **fields) -> dict:
    inputs = [
        {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": values}
        for name, values in (("image", images), ("text", texts))
        if values is not None
    ]
    return {"json": {"inputs": inputs, **fields}}


def read_outputs(response: httpx.Response) -> tuple[dict, dict]:
    """(the JSON header, {output name: values}) of an inference response, JSON or binary, decoded by tritonclient's
    ``InferResult``: BYTES outputs as lists of str, the others as arrays of their shape."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    result = triton.InferResult.from_response_body(response.content, header_length=int(length) if length else None)
    header = result.get_response()
    binary = sum(o["parameters"]["binary_data_size"] for o in header["outputs"] if "data" not in o)
    assert len(response.content) - (int(length) if length else len(response.content)) == binary, "binary left over"
    values = {}
    for output in header["outputs"]:
        array = result.as_numpy(output["name"])
        assert list(array.shape) == output["shape"], output["name"]
        if output["datatype"] == "BYTES":
            values[output["name"]] = [e.decode() if isinstance(e, bytes) else e for e in array.tolist()]
        else:
            values[output["name"]] = array
    return header, values


@pytest.fixture
def client(serve):
    return serve()


@pytest.fixture(scope="module")
def manifest(tiny_store) -> dict:
    return json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())


def classify_v1(client, image: bytes | None, text: str | None) -> dict:
    body = {k: v for k, v in (("image", b64(image) if image else None), ("text", text)) if v is not None}
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_rows_match_v1(values: dict, v1: list[dict], labels: list[str]) -> None:
    for row, expected in enumerate(v1):
        assert values["label"][row] == expected["label"], row
        assert values["expert"][row] == expected["route"]["expert"], row
        assert values["decided_by"][row] == expected["route"]["decided_by"], row
        importance = values["importance"][row]
        assert importance.tolist() == pytest.approx([expected["importance"][m] for m in ("text", "image")], abs=1e-6)
        weights = values["modality_weights"][row].tolist()
        assert weights == pytest.approx([expected["route"]["modality_weights"][m] for m in ("text", "image")], abs=1e-6)
        assert values["probabilities"][row].tolist() == pytest.approx([expected["scores"][k] for k in labels], abs=1e-6)
        assert values["madds"][row] == expected["compute"]["madds"]
        assert values["saved_ratio"][row] == pytest.approx(expected["compute"]["saved_ratio"], abs=1e-6)
        assert values["operating_point"][row] == expected["route"]["operating_point"], row
        assert values["degraded"][row] == expected["route"]["degraded"], row
        assert values["guarded"][row] == expected["route"]["guarded"], row
        assert values["uncertain"][row] == expected["uncertain"], row
        assert values["uncertain_reason"][row] == expected.get("uncertain_reason", ""), row


# -- health and metadata -----------------------------------------------------------------------
def test_server_metadata_health_and_model_readiness(client):
    server = {
        "name": "dynfuse",
        "version": version("dynfuse"),
        "extensions": ["binary_tensor_data", "parameters", "model_repository"],
    }
    assert client.get("/v2").json() == server
    assert client.get("/v2/", follow_redirects=False).json() == server
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for path in ("/v2/models/shapes/ready", "/v2/models/shapes/versions/1/ready"):
        response = client.get(path)
        assert (response.status_code, response.json()) == (200, {"name": "shapes", "ready": True}), path


def test_model_metadata_lists_inputs_outputs_and_labels(client, manifest):
    body = client.get("/v2/models/shapes").json()

    assert client.get("/v2/models/shapes/versions/1").json() == body
    k = len(manifest["labels"])
    assert body == {
        "name": "shapes",
        "versions": ["1"],
        "platform": "dynfuse",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "expert", "datatype": "BYTES", "shape": [-1]},
            {"name": "decided_by", "datatype": "BYTES", "shape": [-1]},
            {"name": "importance", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "modality_weights", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "shapley", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "madds", "datatype": "INT64", "shape": [-1]},
            {"name": "saved_ratio", "datatype": "FP32", "shape": [-1]},
            {"name": "operating_point", "datatype": "BYTES", "shape": [-1]},
            {"name": "degraded", "datatype": "BOOL", "shape": [-1]},
            {"name": "guarded", "datatype": "BOOL", "shape": [-1]},
            {"name": "uncertain", "datatype": "BOOL", "shape": [-1]},
            {"name": "uncertain_reason", "datatype": "BYTES", "shape": [-1]},
        ],
        "labels": manifest["labels"],
    }


@pytest.mark.parametrize(
    ("method", "path", "fragment"),
    [
        ("get", "/v2/models/nope", "unknown model 'nope'"),
        ("get", "/v2/models/nope/ready", "unknown model 'nope'"),
        ("post", "/v2/models/nope/infer", "unknown model 'nope'"),
        ("get", "/v2/models/shapes/versions/9", "no version '9'"),
        ("get", "/v2/models/shapes/versions/9/ready", "no version '9'"),
        ("post", "/v2/models/shapes/versions/9/infer", "no version '9'"),
        ("get", "/v2/nothing", "Not Found"),
    ],
)
def test_unknown_models_versions_and_paths_are_404_with_the_v2_error_shape(client, method, path, fragment):
    response = client.request(method, path, **json_request(texts=["a red circle"]) if method == "post" else {})

    assert response.status_code == 404
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]


# -- inference ---------------------------------------------------------------------------------
def test_json_infer_answers_each_row_like_v1(client, samples, manifest):
    rows = samples[:4]
    response = client.post(INFER, **json_request([b64(s["png"]) for s in rows], [s["text"] for s in rows], id="req-42"))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    header, values = read_outputs(response)
    assert (header["model_name"], header["model_version"], header["id"]) == ("shapes", "1", "req-42")
    assert [o["name"] for o in header["outputs"]] == OUTPUTS
    assert values["probabilities"].shape == (4, len(manifest["labels"]))
    assert values["importance"].shape == (4, 2)
    assert_rows_match_v1(values, [classify_v1(client, s["png"], s["text"]) for s in rows], manifest["labels"])


def test_binary_infer_equals_json_infer_bit_for_bit(client, samples):
    rows = samples[4:9]
    as_json = read_outputs(client.post(INFER, **json_request([b64(s["png"]) for s in rows], [s["text"] for s in rows])))
    response = client.post(
        INFER,
        **binary_request(
            {"image": [s["png"] for s in rows], "text": [s["text"].encode() for s in rows]},
            outputs=[(name, i % 2 == 0) for i, name in enumerate(OUTPUTS)],
        ),
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, values = read_outputs(response)
    assert [("data" in o, "parameters" in o) for o in header["outputs"]] == [
        (i % 2 == 1, i % 2 == 0) for i in range(len(OUTPUTS))
    ]
    for name in OUTPUTS:
        assert np.array_equal(np.asarray(values[name]), np.asarray(as_json[1][name])), name


def test_binary_data_output_sets_the_default_and_an_output_can_override_it(client, samples):
    pair = {"image": [samples[0]["png"]], "text": [samples[0]["text"].encode()]}
    encoded = binary_request(pair)  # tritonclient asks for binary_data_output when it names no output
    everything = client.post(INFER, **encoded)
    header, _ = read_outputs(everything)
    assert [o["name"] for o in header["outputs"]] == OUTPUTS
    assert all("parameters" in o and "data" not in o for o in header["outputs"])

    # An output that names no binary_data takes the request's default: a request tritonclient cannot write, so its
    # JSON is edited here (the binary inputs after it are tritonclient's).
    split = int(encoded["headers"]["Inference-Header-Content-Length"])
    request = json.loads(encoded["content"][:split])
    request["outputs"] = [{"name": "label", "parameters": {"binary_data": False}}, {"name": "madds"}]
    head = json.dumps(request).encode()
    mixed = client.post(
        INFER, content=head + encoded["content"][split:], headers={"Inference-Header-Content-Length": str(len(head))}
    )
    header, values = read_outputs(mixed)
    assert request["parameters"] == {"binary_data_output": True}
    assert [("data" in o) for o in header["outputs"]] == [True, False]
    assert values["label"] == read_outputs(everything)[1]["label"]
    assert values["madds"].tolist() == read_outputs(everything)[1]["madds"].tolist()


def test_outputs_selects_and_orders_the_response_and_no_id_means_none(client, samples):
    response = client.post(
        INFER, **json_request(texts=[samples[0]["text"]], outputs=[{"name": "expert"}, {"name": "label"}])
    )

    header, values = read_outputs(response)
    assert [o["name"] for o in header["outputs"]] == ["expert", "label"]
    assert "id" not in header
    assert values["expert"] == ["text"]


def test_empty_elements_and_left_out_inputs_are_missing_modalities(client, samples):
    png, text = samples[0]["png"], samples[0]["text"]
    as_json = client.post(INFER, **json_request([b64(png), "", b64(png), b64(png)], ["", text, "   ", text]))
    as_binary = client.post(
        INFER, **binary_request({"image": [png, b"", png, png], "text": [b"", text.encode(), b" ", text.encode()]})
    )
    text_only = client.post(INFER, **json_request(texts=[text, text]))
    image_only = client.post(INFER, **binary_request({"image": [png]}))

    image_only_experts = {"image_lite", "image"}  # the router's pick among the experts that need no text
    for response in (as_json, as_binary):
        _, values = read_outputs(response)
        assert values["expert"][1] == "text"
        assert {values["expert"][0], values["expert"][2]} <= image_only_experts
        assert values["decided_by"][:3] == ["missing_modality"] * 3
        assert values["importance"][:3].tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
        assert values["decided_by"][3] != "missing_modality"
    assert read_outputs(text_only)[1]["expert"] == ["text", "text"]
    assert read_outputs(image_only)[1]["expert"][0] in image_only_experts
    assert read_outputs(as_json)[1]["label"][1] == classify_v1(client, None, text)["label"]


def test_route_and_threshold_request_parameters(client, samples):
    rows = samples[:6]
    request = json_request([b64(s["png"]) for s in rows], [s["text"] for s in rows])
    forced = client.post(INFER, json=request["json"] | {"parameters": {"route": "image"}})
    full = client.post(INFER, json=request["json"] | {"parameters": {"threshold": 1}})
    router = client.post(INFER, json=request["json"] | {"parameters": {"threshold": 0.0, "priority": 1}})

    assert read_outputs(forced)[1]["expert"] == ["image"] * 6
    assert read_outputs(forced)[1]["decided_by"] == ["request"] * 6
    model = client.get("/v1/models/shapes").json()
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    routed = read_outputs(router)[1]["expert"]
    escalated = [model["full_expert"] if cost[e] < cost[model["full_expert"]] else e for e in routed]
    assert read_outputs(full)[1]["expert"] == escalated  # from every pick cheaper than the full path
    assert set(read_outputs(router)[1]["decided_by"]) == {"router"}


def test_a_gzip_or_deflate_body_is_decompressed(client, samples):
    request = json_request([b64(samples[0]["png"])], [samples[0]["text"]])
    plain = read_outputs(client.post(INFER, **request))[1]
    body = json.dumps(request["json"]).encode()
    for encoding, compressed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        response = client.post(INFER, content=compressed, headers={"Content-Encoding": encoding})
        assert response.status_code == 200, (encoding, response.text)
        assert read_outputs(response)[1]["label"] == plain["label"]


# -- errors ------------------------------------------------------------------------------------
def raw_json(text: str, **headers) -> dict:
    return {"content": text.encode(), "headers": headers}


def tensor(name="text", shape=(1,), datatype="BYTES", data=("a red circle",), **extra) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": list(data), **extra}


def bad_requests(png: bytes) -> list[tuple[str, dict, int, str]]:
    text = tensor()
    one = {"image": [png], "text": [b"a red circle"]}
    with_binary = binary_request(one)
    header_length = int(with_binary["headers"]["Inference-Header-Content-Length"])
    return [
        ("N differs", json_request([b64(png)] * 2, ["a"] * 3), 400, "disagree on N: image has 2 rows, text 3"),
        ("no inputs", {"json": {"inputs": []}}, 400, "at least one of the inputs"),
        ("a row with neither", json_request([b64(png), ""], ["a", " "]), 400, "row 1 has neither"),
        ("unknown input", {"json": {"inputs": [tensor("caption")]}}, 400, "unknown input 'caption'"),
        ("input twice", {"json": {"inputs": [text, text]}}, 400, "sent twice"),
        ("wrong datatype", {"json": {"inputs": [tensor(datatype="FP32", data=[1.0])]}}, 400, "send BYTES"),
        ("2-D shape", {"json": {"inputs": [tensor(shape=(1, 1))]}}, 400, "is not [N]"),
        ("zero rows", {"json": {"inputs": [tensor(shape=(0,), data=())]}}, 400, "N >= 1"),
        ("negative dim", {"json": {"inputs": [tensor(shape=(-1,))]}}, 400, "greater than or equal to 0"),
        ("shape and data disagree", {"json": {"inputs": [tensor(shape=(3,))]}}, 400, "holds 3 element(s) but 1"),
        ("BYTES as numbers", {"json": {"inputs": [tensor(data=[5])]}}, 400, "strings, not int"),
        ("no data", {"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}}, 400, "no data"),
        ("image not base64", json_request(["@@not base64@@"]), 400, "image[0] (JSON images are base64"),
        ("not an image", json_request([b64(b"these bytes are no picture")]), 400, "row 0: image: not a supported"),
        ("truncated image", json_request([b64(png[: len(png) // 2])]), 400, "row 0: image: truncated"),
        ("unknown route", json_request(texts=["a"], parameters={"route": "gpt"}), 400, "parameter route: 'gpt'"),
        ("threshold over 1", json_request(texts=["a"], parameters={"threshold": 1.5}), 400, "outside [0, 1]"),
        ("threshold a string", json_request(texts=["a"], parameters={"threshold": "hi"}), 400, "not a number"),
        ("unknown parameter", json_request(texts=["a"], parameters={"treshold": 0.5}), 400, "'treshold'"),
        (
            "nested parameter",
            json_request(texts=["a"], parameters={"route": ["a"]}),
            400,
            "parameters.route: Value error, a parameter's value is a string, a number or a boolean",
        ),
        ("route lacks modality", json_request(texts=["a"], parameters={"route": "late_fusion"}), 400, "needs image"),
        ("unknown output", json_request(texts=["a"], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
        ("output twice", json_request(texts=["a"], outputs=[{"name": "label"}] * 2), 400, "requested twice"),
        (
            "classification",
            json_request(texts=["a"], outputs=[{"name": "label", "parameters": {"classification": 3}}]),
            400,
            "classification extension",
        ),
        (
            "shared memory",
            {"json": {"inputs": [tensor(parameters={"shared_memory_region": "r"})]}},
            400,
            "shared memory extension",
        ),
        ("id not a string", json_request(texts=["a"], id=7), 400, "id: Input should be a valid string"),
        ("unknown field", json_request(texts=["a"], input=[]), 400, "input: Extra inputs"),
        ("not JSON", raw_json('{"inputs": ['), 400, "not valid JSON"),
        ("JSON not an object", {"json": ["inputs"]}, 400, "invalid inference request"),
        (
            "data and binary_data_size",
            {"json": {"inputs": [tensor(parameters={"binary_data_size": 4})]}},
            400,
            "not both",
        ),
        (
            "binary without the header",
            {"content": with_binary["content"], "headers": {}},
            400,
            "binary data after the JSON needs the Inference-Header-Content-Length header",
        ),
        (
            "binary_data_size without the header",
            {
                "json": {
                    "inputs": [
                        {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 1}}
                    ]
                }
            },
            400,
            "no Inference-Header-Content-Length",
        ),
        (
            "header not a number",
            {**with_binary, "headers": {"Inference-Header-Content-Length": "x"}},
            400,
            "byte count",
        ),
        (
            "header past the body",
            {**with_binary, "headers": {"Inference-Header-Content-Length": "999999"}},
            400,
            "the body has",
        ),
        (
            "header cuts the JSON",
            {**with_binary, "headers": {"Inference-Header-Content-Length": str(header_length - 5)}},
            400,
            "check Inference-Header-Content-Length",
        ),
        ("binary truncated", {**with_binary, "content": with_binary["content"][:-10]}, 400, "remain after the JSON"),
        ("binary left over", {**with_binary, "content": with_binary["content"] + b"xx"}, 400, "belong to no input"),
        (
            "element longer than its tensor",
            _with_raw_text(struct.pack("<I", 50) + b"short"),
            400,
            "element 0 declares 50 bytes",
        ),
        (
            "element count off",
            _with_raw_text(serialize_byte_tensor(np.array([b"a", b"b"], dtype=np.object_)).item()),
            400,
            "holds 1 element(s) but more than 1",
        ),
        ("text not UTF-8", binary_request({"text": [b"\xff\xfe"]}), 400, "text[0]: not valid UTF-8"),
        ("unknown encoding", {**json_request(texts=["a"]), "headers": {"Content-Encoding": "br"}}, 400, "'br'"),
        ("corrupt gzip", {"content": b"\x1f\x8bnot gzip", "headers": {"Content-Encoding": "gzip"}}, 400, "gzip"),
        # Over a limit: 413, as /v1.
        ("body over the limit", raw_json("{" + " " * 70_000 + "}"), 413, "over the limit"),
        (
            "gzip bomb",
            {"content": gzip.compress(b" " * 200_000), "headers": {"Content-Encoding": "gzip"}},
            413,
            "expands",
        ),
        ("too many pixels", json_request([b64(png_of_size(300, 300))]), 413, "row 0: image: 300x300"),
        ("text over the limit", json_request(texts=["word " * 100]), 413, "row 0: text: 500 characters"),
        ("rows over the limit", json_request(texts=["a"] * 5), 413, "inputs[0].data: over the limit of 4 elements"),
    ]


def _with_raw_text(raw: bytes) -> dict:
    header = json.dumps(
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    return {"content": header + raw, "headers": {"Inference-Header-Content-Length": str(len(header))}}


def test_each_bad_request_gets_400_or_413_with_the_spec_error_shape(serve, samples):
    client = serve(max_body_bytes=64 * 1024, max_image_pixels=256 * 256, max_text_chars=200, max_batch_inputs=4)
    png = samples[0]["png"]
    for name, request, status, fragment in bad_requests(png):
        response = client.post(INFER, **request)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        body = response.json()
        assert list(body) == ["error"], name
        assert fragment in body["error"], f"{name}: {body['error']!r}"

    good = client.post(INFER, **binary_request({"image": [png], "text": [b"a red circle"]}))
    assert good.status_code == 200


# -- metrics, auth, readiness, docs ------------------------------------------------------------
def test_metrics_count_v2_infers_like_v1(client, samples):
    png, text = samples[0]["png"], samples[0]["text"]
    responses = [
        client.post(INFER, **json_request([b64(png), b64(samples[1]["png"])], [text, samples[1]["text"]])),
        client.post(INFER, **binary_request({"image": [png, png, b""], "text": [b"", text.encode(), text.encode()]})),
        client.post("/v2/models/shapes/versions/1/infer", **json_request(texts=[text], parameters={"route": "text"})),
    ]
    refused = client.post(INFER, **json_request(texts=["a"], parameters={"route": "gpt"}))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert refused.status_code == 400
    rows = [read_outputs(r)[1] for r in responses]

    metrics = scrape(client)
    # one per HTTP call
    labels = {"model": "shapes", "protocol": "http", "key": "anonymous"}
    assert value(metrics, "dynfuse_requests_total", status="200", **labels) == 3
    assert value(metrics, "dynfuse_requests_total", status="400", **labels) == 1
    assert value(metrics, "dynfuse_rejected_requests_total", model="shapes", reason="invalid") == 1
    decisions = Counter((e, d) for r in rows for e, d in zip(r["expert"], r["decided_by"], strict=True))
    assert sum(decisions.values()) == 6
    for (expert, decided_by), count in decisions.items():
        labels = {"model": "shapes", "expert": expert, "decided_by": decided_by}
        assert value(metrics, "dynfuse_route_decisions_total", **labels) == count
    assert value(metrics, "dynfuse_compute_madds_total", model="shapes") == sum(int(r["madds"].sum()) for r in rows)
    assert value(metrics, "dynfuse_queue_duration_seconds_count", model="shapes") == 6
    for expert, count in Counter(e for r in rows for e in r["expert"]).items():
        assert (
            value(metrics, "dynfuse_modality_importance_count", model="shapes", expert=expert, modality="text") == count
        )
    assert value(metrics, "dynfuse_modality_weight_count", model="shapes", modality="text") == 6


def test_api_key_guards_infer_and_model_metadata_not_health(serve):
    client = serve(api_key="s3cret")
    request = json_request(texts=["a red circle"])

    for response in (client.post(INFER, **request), client.get("/v2/models/shapes")):
        assert response.status_code == 401
        assert "API key" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    key = {"Authorization": "Bearer s3cret"}
    assert client.post(INFER, **request, headers=key).status_code == 200
    assert client.get("/v2/models/shapes", headers=key).status_code == 200
    for open_path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/shapes/ready"):
        assert client.get(open_path).status_code == 200, open_path


def test_before_the_model_is_loaded_readiness_and_infer_are_503(tiny_store, held_model_load):
    from service.config import Settings
    from service.main import create_app

    async def scenario():
        app = create_app(Settings(store=tiny_store))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dynfuse") as client:
                early = {
                    path: await client.get(path)
                    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/shapes/ready", "/v2/models/x/ready")
                }
                early["infer"] = await client.post(INFER, **json_request(texts=["a"]))
                held_model_load.set()
                for _ in range(600):
                    if (await client.get("/v2/health/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                return early, await client.get("/v2/models/shapes/ready")

    early, late = asyncio.run(scenario())
    assert early["/v2/health/live"].status_code == 200
    assert (early["/v2/health/ready"].status_code, early["/v2/health/ready"].json()) == (503, {"ready": False})
    assert early["/v2/health/ready"].headers["retry-after"] == "1"
    model = early["/v2/models/shapes/ready"]
    assert (model.status_code, model.json()) == (503, {"name": "shapes", "ready": False})
    assert early["/v2/models/x/ready"].status_code == 404
    assert early["infer"].status_code == 503
    assert list(early["infer"].json()) == ["error"]
    assert early["infer"].headers["retry-after"] == "1"
    assert late.status_code == 200


def test_docs_describe_the_v2_request(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v2/models/{name}/infer"]["post"]
    content = operation["requestBody"]["content"]

    # The binary extension has no JSON Schema: the operation describes it in words.
    assert "Inference-Header-Content-Length" in operation["description"]
    request = content["application/json"]["schema"]
    assert "$defs" not in json.dumps(request)
    for tensor in request["properties"]["inputs"]["items"]["anyOf"]:  # one schema per input: image, text
        assert tensor["properties"]["data"]["description"]
    assert set(operation["responses"]) >= {"200", "400", "404", "413", "503"}
    assert "/v2/models/{name}/versions/{version}/infer" in spec["paths"]
