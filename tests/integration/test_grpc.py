"""The Open Inference Protocol over gRPC, in process: the app on FastAPI's TestClient with DYNFUSE_GRPC_PORT=0, and
the real ``tritonclient.grpc`` (PyPI) against the port it bound. Requests tritonclient would never send are built
with tritonclient's own generated messages and stub (``tritonclient.grpc.service_pb2``), not dynfuse's.

The expected answers come from the same requests over HTTP's /v2 (JSON), which tests/integration/test_kserve_v2.py
checks against /v1."""

from __future__ import annotations

import gzip
import io
import json
import resource
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import png_of_size, scrape, value
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

OUTPUTS = [
    "label", "probabilities", "expert", "decided_by", "importance", "modality_weights", "madds", "saved_ratio",
    "operating_point", "degraded", "guarded", "uncertain", "uncertain_reason",
]  # fmt: skip
NUMPY = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
KEY = "grpc-s3cret"
GRPC = {"model": "shapes", "protocol": "grpc", "key": "anonymous"}  # the labels of a gRPC request without a key
HTTP = {**GRPC, "protocol": "http"}


@pytest.fixture
def grpc_serve(serve):
    """``start(**settings)`` -> (TestClient, tritonclient.grpc client, "host:port") on a ready app serving gRPC."""
    clients = []

    def start(**settings):
        http = serve(grpc_port=0, **settings)
        url = f"127.0.0.1:{http.app.state.grpc.port}"
        client = triton.InferenceServerClient(url)
        clients.append(client)
        return http, client, url

    yield start
    for client in clients:
        client.close()


def bytes_input(name: str, elements: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
    return tensor


def grpc_values(result) -> dict:
    """Every output of a tritonclient.grpc result, as the HTTP reader below gives them."""
    values = {}
    for output in result.get_response().outputs:
        array = result.as_numpy(output.name)
        values[output.name] = [e.decode() for e in array.tolist()] if output.datatype == "BYTES" else array
    return values


def http_values(http, images: list[bytes] | None, texts: list[str] | None, **parameters) -> dict:
    """The same request over HTTP /v2 (JSON data: images base64, texts as strings)."""
    import base64

    inputs = []
    if images is not None:
        inputs.append({"name": "image", "shape": [len(images)], "datatype": "BYTES",
                       "data": [base64.b64encode(i).decode() for i in images]})  # fmt: skip
    if texts is not None:
        inputs.append({"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts})
    response = http.post("/v2/models/shapes/infer", json={"inputs": inputs, "parameters": parameters})
    assert response.status_code == 200, response.text
    values = {}
    for output in response.json()["outputs"]:
        data = output["data"]
        if output["datatype"] != "BYTES":
            data = np.array(data, NUMPY[output["datatype"]]).reshape(output["shape"])
        values[output["name"]] = data
    return values


def assert_same_outputs(got: dict, expected: dict) -> None:
    assert list(got) == OUTPUTS
    assert set(expected) == set(OUTPUTS)
    for name in OUTPUTS:
        if isinstance(expected[name], list):
            assert got[name] == expected[name], name
        else:
            # One request, alone in its micro-batch, over either transport: the same float32 bits.
            assert got[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def raw_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def infer_request(inputs: dict[str, list[bytes]], model: str = "shapes", **fields) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest as tritonclient.grpc builds one: BYTES tensors in raw_input_contents."""
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    for name, elements in inputs.items():
        request.inputs.add(name=name, datatype="BYTES", shape=[len(elements)])
        request.raw_input_contents.append(raw_bytes(elements))
    return request


def call(url: str, method: str, request, metadata=None, timeout: float = 30):
    """One unary call through tritonclient's generated stub: (response, None) or (None, grpc.RpcError)."""
    with grpc.insecure_channel(url) as channel:
        try:
            return getattr(service_pb2_grpc.GRPCInferenceServiceStub(channel), method)(
                request, metadata=metadata, timeout=timeout
            ), None
        except grpc.RpcError as error:
            return None, error


# -- health and metadata -----------------------------------------------------------------------
def test_health_server_and_model_metadata_and_config(grpc_serve, manifest):
    _, client, _ = grpc_serve()

    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("shapes")
    assert client.is_model_ready("shapes", "1")
    assert not client.is_model_ready("shapes", "9")  # as Triton answers over gRPC: not ready, no error
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "dynfuse"
    assert "model_repository" in server["extensions"]
    model = client.get_model_metadata("shapes", "1", as_json=True)
    assert (model["name"], model["versions"], model["platform"]) == ("shapes", ["1"], "dynfuse")
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("image", "BYTES", ["-1"]),  # protobuf's JSON spells int64 as strings
        ("text", "BYTES", ["-1"]),
    ]
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model["outputs"]}
    assert list(outputs) == [*OUTPUTS[:6], "shapley", *OUTPUTS[6:]]  # shapley is sent only with explain
    assert outputs["shapley"] == ("FP32", [-1, 2])
    labels = manifest["labels"]
    assert outputs["probabilities"] == ("FP32", [-1, len(labels)])
    assert outputs["importance"] == ("FP32", [-1, 2])
    assert outputs["madds"] == ("INT64", [-1])
    assert outputs["uncertain"] == ("BOOL", [-1])
    config = client.get_model_config("shapes", as_json=True)["config"]
    assert (config["name"], config["platform"]) == ("shapes", "dynfuse")
    assert json.loads(config["parameters"]["labels"]["string_value"]) == labels
    assert config["parameters"]["full_expert"]["string_value"] == manifest["full_expert"]
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("image", "TYPE_STRING"), ("text", "TYPE_STRING")]
    types = {o["name"]: o["data_type"] for o in config["output"]}
    assert (types["madds"], types["guarded"], types["uncertain_reason"]) == ("TYPE_INT64", "TYPE_BOOL", "TYPE_STRING")
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("shapes", "9")
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "no version '9'" in missing.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


# -- inference ---------------------------------------------------------------------------------
PARAMETERS = [
    {},
    {"route": "auto"},
    {"route": "soft"},
    {"route": "text"},
    {"route": "mulmix"},
    {"threshold": 0.9},
    {"operating_point": "lambda_0"},
    {"min_confidence": 0.99},
]


@pytest.mark.parametrize("parameters", PARAMETERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "none")
def test_infer_gives_the_outputs_of_v2_over_http(grpc_serve, samples, parameters):
    http, client, _ = grpc_serve()
    rows = samples[:6]
    images, texts = [s["png"] for s in rows], [s["text"] for s in rows]

    result = client.infer(
        "shapes",
        [bytes_input("image", images), bytes_input("text", [t.encode() for t in texts])],
        parameters=parameters,
        request_id="req-7",
    )
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("shapes", "1", "req-7")
    assert_same_outputs(grpc_values(result), http_values(http, images, texts, **parameters))


def test_missing_modalities_left_out_or_empty_as_over_http(grpc_serve, samples):
    http, client, _ = grpc_serve()
    rows = samples[:3]
    texts = [s["text"] for s in rows]
    text_only = client.infer("shapes", [bytes_input("text", [t.encode() for t in texts])])
    assert_same_outputs(grpc_values(text_only), http_values(http, None, texts))
    assert set(grpc_values(text_only)["decided_by"]) <= {"missing_modality", "router"}

    images = [rows[0]["png"], b"", rows[2]["png"]]  # row 1 has no image: its text alone decides
    mixed_texts = ["", texts[1], texts[2]]  # row 0 has no text
    mixed = client.infer(
        "shapes", [bytes_input("image", images), bytes_input("text", [t.encode() for t in mixed_texts])]
    )
    assert_same_outputs(grpc_values(mixed), http_values(http, images, mixed_texts))
    assert grpc_values(mixed)["decided_by"][:2] == ["missing_modality", "missing_modality"]


def test_bytes_contents_as_kserve_may_send_them_equal_raw_input_contents(grpc_serve, samples):
    _, _, url = grpc_serve()
    rows = samples[:4]
    inputs = {"image": [s["png"] for s in rows], "text": [s["text"].encode() for s in rows]}
    raw, error = call(url, "ModelInfer", infer_request(inputs))
    assert error is None, error
    contents = service_pb2.ModelInferRequest(model_name="shapes")
    for name, elements in inputs.items():
        tensor = contents.inputs.add(name=name, datatype="BYTES", shape=[len(elements)])
        tensor.contents.bytes_contents.extend(elements)
    answer, error = call(url, "ModelInfer", contents)
    assert error is None, error
    assert answer == raw
    assert [o.name for o in answer.outputs] == OUTPUTS
    assert len(answer.raw_output_contents) == len(OUTPUTS)  # every output as raw bytes, as Triton sends them


def test_requested_outputs_select_and_order_the_response(grpc_serve, samples):
    _, client, _ = grpc_serve()
    rows = samples[:2]
    inputs = [bytes_input("image", [s["png"] for s in rows]), bytes_input("text", [s["text"].encode() for s in rows])]
    outputs = [triton.InferRequestedOutput("madds"), triton.InferRequestedOutput("label")]
    result = client.infer("shapes", inputs, outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["madds", "label"]
    assert result.as_numpy("madds").dtype == np.int64
    assert result.as_numpy("probabilities") is None
    with pytest.raises(InferenceServerException) as classification:
        client.infer("shapes", inputs, outputs=[triton.InferRequestedOutput("label", class_count=3)])
    assert classification.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "classification extension is not supported" in classification.value.message()


# -- errors ------------------------------------------------------------------------------------
def _png(side: int) -> bytes:
    return png_of_size(side, side)


def _corrupt_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()[:30]


def _requests(sample: dict) -> list[tuple[str, service_pb2.ModelInferRequest, str, str, str]]:
    """(case, request, gRPC code, part of the message, the HTTP status the metrics count)."""
    image, text = sample["png"], sample["text"].encode()
    good = {"image": [image], "text": [text]}
    cases = []

    def case(name, request, code, fragment, status="400"):
        cases.append((name, request, code, fragment, status))

    case("unknown input", infer_request({"picture": [image]}), "INVALID_ARGUMENT", "unknown input 'picture'")
    wrong_type = infer_request(good)
    wrong_type.inputs[0].datatype = "FP32"
    case("datatype", wrong_type, "INVALID_ARGUMENT", "datatype 'FP32'; send BYTES")
    short = infer_request(good)
    short.inputs[1].shape[:] = [2]
    case("shape holds more", short, "INVALID_ARGUMENT", "holds 2 element(s) but 1 were sent")
    lying = infer_request({"text": [text]})  # one element declared, 2.5 million empty ones sent (9.5 MiB)
    lying.raw_input_contents[0] = raw_bytes([text]) + b"\x00\x00\x00\x00" * 2_500_000
    case("shape holds fewer (raw)", lying, "INVALID_ARGUMENT", "holds 1 element(s) but more than 1 were sent")
    lying_contents = service_pb2.ModelInferRequest(model_name="shapes")
    lying_contents.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([text] * 3)
    case("shape holds fewer (contents)", lying_contents, "INVALID_ARGUMENT", "holds 1 element(s) but more than 1")
    matrix = infer_request(good)
    matrix.inputs[1].shape[:] = [1, 1]
    case("shape not [N]", matrix, "INVALID_ARGUMENT", "is not [N]")
    negative = infer_request(good)
    negative.inputs[1].shape[:] = [-1]
    case("negative shape", negative, "INVALID_ARGUMENT", "is not [N]")
    missing_raw = infer_request(good)
    del missing_raw.raw_input_contents[1]
    case("raw for one input of two", missing_raw, "INVALID_ARGUMENT", "raw_input_contents has 1 entries for 2 inputs")
    truncated = infer_request(good)
    truncated.raw_input_contents[1] = truncated.raw_input_contents[1][:-3]  # the element's length says 3 more
    case("BYTES length past the end", truncated, "INVALID_ARGUMENT", "declares")
    both = infer_request(good)
    both.inputs[1].contents.bytes_contents.append(text)
    case("contents and raw", both, "INVALID_ARGUMENT", "not both")
    case("no inputs", infer_request({}), "INVALID_ARGUMENT", "send at least one of the inputs")
    case("disagreeing N", infer_request({"image": [image], "text": [text, text]}), "INVALID_ARGUMENT", "disagree on N")
    case("empty row", infer_request({"image": [b""], "text": [b"  "]}), "INVALID_ARGUMENT", "row 0 has neither")
    case("not an image", infer_request({"image": [b"GIF89a not really"]}), "INVALID_ARGUMENT", "row 0")
    case("corrupt image", infer_request({"image": [_corrupt_png()]}), "INVALID_ARGUMENT", "row 0")
    case("text not UTF-8", infer_request({"text": [b"\xff\xfe"]}), "INVALID_ARGUMENT", "not valid UTF-8")
    route = infer_request(good)
    route.parameters["route"].string_param = "fastest"
    case("unknown route", route, "INVALID_ARGUMENT", "parameter route: 'fastest'")
    forced = infer_request({"text": [text]})
    forced.parameters["route"].string_param = "image"
    case("route needs the image", forced, "INVALID_ARGUMENT", "row 0")
    threshold = infer_request(good)
    threshold.parameters["threshold"].double_param = 1.5
    case("threshold out of range", threshold, "INVALID_ARGUMENT", "outside [0, 1]")
    nan = infer_request(good)
    nan.parameters["min_confidence"].double_param = float("nan")
    case("NaN", nan, "INVALID_ARGUMENT", "not a number in [0, 1]")
    point = infer_request(good)
    point.parameters["operating_point"].int64_param = 3
    case("operating point not a name", point, "INVALID_ARGUMENT", "parameter operating_point: 3")
    typo = infer_request(good)
    typo.parameters["rout"].string_param = "auto"
    case("unknown parameter", typo, "INVALID_ARGUMENT", "unknown parameter(s) 'rout'")
    unset = infer_request(good)
    unset.parameters["route"].Clear()
    case("parameter without value", unset, "INVALID_ARGUMENT", "has no value")
    shared = infer_request(good)
    shared.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    case("shared memory", shared, "INVALID_ARGUMENT", "shared memory extension is not supported")
    output = infer_request(good)
    output.outputs.add(name="logits")
    case("unknown output", output, "INVALID_ARGUMENT", "unknown output 'logits'")
    twice = infer_request(good)
    twice.outputs.add(name="label")
    twice.outputs.add(name="label")
    case("output twice", twice, "INVALID_ARGUMENT", "requested twice")
    case("no model name", infer_request(good, model=""), "INVALID_ARGUMENT", "model_name is empty", "400")
    case("unknown model", infer_request(good, model="nope"), "NOT_FOUND", "unknown model 'nope'", "404")
    case("unknown version", infer_request(good, model_version="9"), "NOT_FOUND", "no version '9'", "404")
    case("rows over the limit", infer_request({"text": [text] * 9}), "RESOURCE_EXHAUSTED", "over the limit of 8", "413")
    case("text too long", infer_request({"text": [b"a" * 3000]}), "RESOURCE_EXHAUSTED", "2,000", "413")
    case("image too large", infer_request({"image": [_png(200)]}), "RESOURCE_EXHAUSTED", "pixels", "413")
    return cases


def test_each_bad_request_gets_its_status_code_and_a_message_and_is_counted(grpc_serve, samples):
    http, _, url = grpc_serve(max_batch_inputs=8, max_image_pixels=100 * 100)
    cases = _requests(samples[0])
    counted: dict[str, int] = {}
    for name, request, code, fragment, status in cases:
        answer, error = call(url, "ModelInfer", request)
        assert error is not None, f"{name}: answered {answer}"
        assert error.code().name == code, f"{name}: {error.code()} {error.details()}"
        assert fragment in error.details(), f"{name}: {error.details()}"
        counted[status] = counted.get(status, 0) + 1
    metrics = scrape(http)
    for status, count in counted.items():
        assert value(metrics, "dynfuse_requests_total", status=status, **GRPC) == count, status
    assert value(metrics, "dynfuse_requests_total", status="500", **GRPC) == 0
    assert value(metrics, "dynfuse_requests_total", status="400", **HTTP) == 0


def test_a_message_that_does_not_parse_is_invalid_argument_not_unknown(grpc_serve):
    http, _, url = grpc_serve()
    with grpc.insecure_channel(url) as channel:
        for method in ("ModelInfer", "ServerLive", "ModelMetadata"):
            raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as failed:
                raw(b"\x0a\xff\xff\xff\x0f", timeout=30)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "is not a valid inference." in failed.value.details()
    assert value(scrape(http), "dynfuse_requests_total", status="400", **GRPC) == 1


def test_a_message_over_the_body_limit_is_refused_compressed_or_not(grpc_serve, samples):
    _, client, _ = grpc_serve(max_body_bytes=64 * 1024)
    big = [b"x" * (80 * 1024)]  # one text of 80 KiB: over the 64 KiB a message may have
    with pytest.raises(InferenceServerException) as plain:
        client.infer("shapes", [bytes_input("text", big)])
    assert plain.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(64 * 1024) in plain.value.message()
    # gzip takes it to a few hundred bytes on the wire; the limit holds for what it expands to.
    assert len(gzip.compress(big[0])) < 1024
    with pytest.raises(InferenceServerException) as compressed:
        client.infer("shapes", [bytes_input("text", big)], compression_algorithm="gzip")
    assert compressed.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    small = client.infer("shapes", [bytes_input("text", [samples[0]["text"].encode()])], compression_algorithm="gzip")
    assert small.as_numpy("label").shape == (1,)


def test_a_message_of_millions_of_empty_values_is_refused_before_it_is_built(grpc_serve, samples, monkeypatch):
    """Within the byte limit, 10 MiB of empty input tensors would be 5 million messages and hundreds of MiB once
    parsed: refused on its bytes, in work bounded by the limit (not by the message), with the process's peak memory
    unmoved (service/grpc/wire_limits.py)."""
    from service.grpc import wire_limits

    http, client, url = grpc_serve()
    head = service_pb2.ModelInferRequest(model_name="shapes").SerializeToString()
    bomb = head + b"\x2a\x00" * ((10 * 1024 * 1024 - 4096) // 2)  # field 5 (inputs), empty, over and over
    # The walk's work, counted rather than timed (a wall-clock bound depends on the machine's load): every value it
    # walks costs it two varint reads at most, its tag and its length (or value).
    varint, reads = wire_limits._varint, []  # where each read starts, in the message's bytes

    def counted(data, pos, end):
        reads.append(pos)
        return varint(data, pos, end)

    monkeypatch.setattr(wire_limits, "_varint", counted)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1)]) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            raw(bomb, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 768 values" in refused.value.details()  # 8 per row of DYNFUSE_MAX_BATCH_INPUTS=64, +256
    assert "DYNFUSE_MAX_BATCH_INPUTS" in refused.value.details()
    # The walk stopped at the 769th value (the name, then 768 empty inputs), 1.5 KB into 10 MiB of 5.2 million values.
    assert 769 <= len(reads) <= 2 * 769
    assert max(reads) < len(head) + 2 * 769
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024 < 100  # MiB; parsed: +455
    assert value(scrape(http), "dynfuse_requests_total", status="413", **GRPC) == 1
    assert value(scrape(http), "dynfuse_rejected_requests_total", model="shapes", reason="too_large") == 1
    text = client.infer("shapes", [bytes_input("text", [samples[0]["text"].encode()])])  # still serving
    assert text.as_numpy("label").shape == (1,)


def test_unimplemented_calls_say_so(grpc_serve):
    _, client, url = grpc_serve()
    with pytest.raises(InferenceServerException) as statistics:
        client.get_inference_statistics("shapes")
    assert statistics.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "/metrics" in statistics.value.message()
    _, shared = call(url, "SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(name="r"))
    assert shared.code() == grpc.StatusCode.UNIMPLEMENTED


# -- keys --------------------------------------------------------------------------------------
def test_the_api_key_guards_metadata_config_and_infer_not_health(grpc_serve, samples):
    _, client, _ = grpc_serve(api_key=KEY)
    inputs = [bytes_input("text", [samples[0]["text"].encode()])]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("shapes")
    assert client.get_server_metadata().name == "dynfuse"
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        for guarded in (
            lambda h: client.get_model_metadata("shapes", headers=h),
            lambda h: client.get_model_config("shapes", headers=h),
            lambda h: client.infer("shapes", inputs, headers=h),
        ):
            with pytest.raises(InferenceServerException) as refused:
                guarded(headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "Authorization: Bearer <key>" in refused.value.message()
    good = {"authorization": f"Bearer {KEY}"}
    assert client.get_model_metadata("shapes", headers=good).name == "shapes"
    assert client.infer("shapes", inputs, headers=good).as_numpy("label").shape == (1,)
