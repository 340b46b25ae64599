"""The real ``tritonclient.http`` (PyPI), unchanged, against a real ``dynfuse serve`` on loopback: what a
Triton or KServe user's code does must work here, and give the answers /v1 gives."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

KEY = "s3cret"


def connect(base: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=base.removeprefix("http://"), connection_timeout=10, network_timeout=30)


def bytes_input(name: str, elements: list, binary: bool) -> triton.InferInput:
    return triton.InferInput(name, [len(elements)], "BYTES").set_data_from_numpy(
        np.array(elements, dtype=np.object_), binary_data=binary
    )


def as_strings(array: np.ndarray) -> list[str]:
    """BYTES outputs come back as bytes (binary) or str (JSON), depending on how they were sent."""
    return [e.decode() if isinstance(e, bytes) else e for e in array.tolist()]


def classify_v1(base: str, sample: dict, headers: dict | None = None) -> dict:
    response = httpx.post(
        f"{base}/v1/classify",
        files={"image": ("s.png", sample["png"], "image/png")},
        data={"text": sample["text"]},
        headers=headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_metadata_and_readiness(server_process):
    _, base = server_process()
    client = connect(base)

    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("shapes")
    assert client.is_model_ready("shapes", "1")
    assert not client.is_model_ready("shapes", "9")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "dynfuse"
    assert "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("shapes", "1")
    assert (model["name"], model["versions"], model["platform"]) == ("shapes", ["1"], "dynfuse")
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("image", "BYTES", [-1]),
        ("text", "BYTES", [-1]),
    ]
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, len(model["labels"])])
    assert outputs["importance"] == ("FP32", [-1, 2])
    assert outputs["madds"] == ("INT64", [-1])
    assert outputs["label"] == outputs["expert"] == ("BYTES", [-1])
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("shapes", "9")
    assert missing.value.status() == "404"
    assert "no version '9'" in missing.value.message()


def test_binary_infer_gives_v1_answers_in_binary_and_json_outputs(server_process, samples):
    _, base = server_process()
    client = connect(base)
    rows = samples[:6]
    inputs = [
        bytes_input("image", [s["png"] for s in rows], binary=True),
        bytes_input("text", [s["text"].encode() for s in rows], binary=True),
    ]
    outputs = [
        triton.InferRequestedOutput("label", binary_data=True),
        triton.InferRequestedOutput("expert", binary_data=False),
        triton.InferRequestedOutput("importance", binary_data=True),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]

    result = client.infer("shapes", inputs, outputs=outputs, request_id="batch-1")
    model_labels = client.get_model_metadata("shapes")["labels"]  # the order of the probabilities' columns

    response = result.get_response()
    assert response["id"] == "batch-1"
    assert [o["name"] for o in response["outputs"]] == ["label", "expert", "importance", "probabilities"]
    assert result.as_numpy("madds") is None  # not requested
    labels, experts = as_strings(result.as_numpy("label")), as_strings(result.as_numpy("expert"))
    importance = result.as_numpy("importance")  # (6, 2): text, image
    probabilities = result.as_numpy("probabilities")  # (6, K)
    assert importance.shape == (6, 2)
    assert importance.dtype == probabilities.dtype == np.float32
    for row, sample in enumerate(rows):
        v1 = classify_v1(base, sample)
        assert labels[row] == v1["label"]
        assert experts[row] == v1["route"]["expert"]
        assert importance[row].tolist() == pytest.approx(
            [v1["importance"]["text"], v1["importance"]["image"]], abs=1e-6
        )
        assert probabilities[row].tolist() == pytest.approx([v1["scores"][label] for label in model_labels], abs=1e-6)
        assert model_labels[int(probabilities[row].argmax())] == labels[row]


def test_json_inputs_carry_images_as_base64_and_parameters_route(server_process, samples):
    _, base = server_process()
    client = connect(base)
    rows = samples[6:10]
    binary = client.infer(
        "shapes",
        [
            bytes_input("image", [s["png"] for s in rows], binary=True),
            bytes_input("text", [s["text"] for s in rows], binary=True),
        ],
    )
    as_json = client.infer(
        "shapes",
        [
            bytes_input("image", [base64.b64encode(s["png"]).decode() for s in rows], binary=False),
            bytes_input("text", [s["text"] for s in rows], binary=False),
        ],
        outputs=[triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "madds", "importance")],
    )

    assert as_strings(as_json.as_numpy("label")) == as_strings(binary.as_numpy("label"))
    assert np.array_equal(as_json.as_numpy("madds"), binary.as_numpy("madds"))
    assert np.array_equal(as_json.as_numpy("importance"), binary.as_numpy("importance"))  # bit for bit
    # Why images in JSON are base64: the client can't put an image file's raw bytes in a JSON string.
    with pytest.raises(InferenceServerException, match="binary_data=True"):
        bytes_input("image", [rows[0]["png"]], binary=False)

    forced = client.infer(
        "shapes",
        [bytes_input("image", [s["png"] for s in rows], binary=True), bytes_input("text", ["", "x", "", "y"], True)],
        parameters={"route": "image"},
    )
    assert as_strings(forced.as_numpy("expert")) == ["image"] * 4
    assert as_strings(forced.as_numpy("decided_by")) == ["request"] * 4  # a forced route outranks a missing text


def test_bad_requests_raise_inference_server_exception_with_the_message(server_process, samples):
    _, base = server_process()
    client = connect(base)
    png = samples[0]["png"]

    cases = [
        ([bytes_input("image", [png, png], True), bytes_input("text", ["a"], True)], {}, "disagree on N"),
        ([bytes_input("text", ["a"], True)], {"route": "gpt"}, "parameter route: 'gpt'"),
        ([bytes_input("image", [b"not an image"], True)], {}, "row 0: image: not a supported image file"),
        ([bytes_input("image", [b""], True), bytes_input("text", [""], True)], {}, "row 0 has neither"),
    ]
    for inputs, parameters, fragment in cases:
        with pytest.raises(InferenceServerException) as error:
            client.infer("shapes", inputs, parameters=parameters)
        assert error.value.status() == "400", error.value
        assert fragment in error.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [bytes_input("text", ["a"], True)])
    assert unknown.value.status() == "404"
    after = client.infer("shapes", [bytes_input("text", ["a red circle"], True)])  # the client still works
    v1 = httpx.post(f"{base}/v1/classify", json={"text": "a red circle"}, timeout=10).json()
    assert as_strings(after.as_numpy("label")) == [v1["label"]]
    assert as_strings(after.as_numpy("expert")) == ["text"]


def test_api_key_and_a_gzip_request_body(server_process, samples):
    _, base = server_process(api_key=KEY)
    client = connect(base)
    inputs = [bytes_input("image", [samples[0]["png"]], True), bytes_input("text", [samples[0]["text"]], True)]

    assert client.is_server_ready()
    assert client.is_model_ready("shapes")
    with pytest.raises(InferenceServerException) as refused:
        client.infer("shapes", inputs)
    assert refused.value.status() == "401"
    assert "API key" in refused.value.message()
    headers = {"Authorization": f"Bearer {KEY}"}
    # Copies: tritonclient adds its own headers to the dict it is given.
    result = client.infer("shapes", inputs, headers=dict(headers), request_compression_algorithm="gzip")
    v1 = classify_v1(base, samples[0], headers=headers)
    assert as_strings(result.as_numpy("label")) == [v1["label"]]
    assert as_strings(result.as_numpy("expert")) == [v1["route"]["expert"]]
    assert client.get_model_metadata("shapes", headers=dict(headers))["name"] == "shapes"
