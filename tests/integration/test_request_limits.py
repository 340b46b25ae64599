"""Every count or size a client controls is bounded before work, and no input is silently lost: a form means
what the same JSON means, and a multipart body cut short is refused instead of answered from less."""

from __future__ import annotations

import json
import struct
import time

import pytest
from conftest import b64

BOUNDARY = "dynfuse-test-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
INFER = "/v2/models/shapes/infer"


@pytest.fixture
def client(serve):
    return serve()


def multipart(fields: dict[str, str], image: bytes | None) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    if image is not None:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + image + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(client, samples):
    sample = samples[0]
    whole = multipart({"text": sample["text"]}, sample["png"])
    assert client.post("/v1/classify", content=whole, headers=MULTIPART).status_code == 200
    for cut in (
        whole[: -len(f"--{BOUNDARY}--\r\n")],  # every part complete, the closing delimiter missing
        whole[: -len(f"\r\n--{BOUNDARY}--\r\n")],  # the image's part unterminated: its bytes all there
        whole[: len(whole) // 2],  # the image cut in the middle
        whole.replace(f"--{BOUNDARY}--".encode(), f"--{BOUNDARY}".encode()),  # a boundary, not the closing one
    ):
        response = client.post("/v1/classify", content=cut, headers=MULTIPART)
        assert response.status_code == 400, response.text
        assert "closing boundary" in response.json()["error"]["message"]


def test_an_empty_form_field_means_what_the_same_empty_json_string_means(client, samples):
    sample = samples[1]
    # an empty text beside an image: a missing modality, in a form as in JSON
    form = client.post("/v1/classify", files={"image": ("a.png", sample["png"], "image/png")}, data={"text": ""})
    as_json = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": ""})
    assert form.status_code == as_json.status_code == 200
    assert form.json()["route"]["decided_by"] == as_json.json()["route"]["decided_by"] == "missing_modality"
    assert form.json()["label"] == as_json.json()["label"]
    assert form.json()["importance"] == as_json.json()["importance"] == {"text": 0.0, "image": 1.0}
    # every other field left empty is refused, as its empty JSON string is
    for field in ("route", "operating_point", "model", "threshold", "min_confidence"):
        by_form = client.post("/v1/classify", data={"text": "a red circle", field: ""})
        assert by_form.status_code == 422, (field, by_form.text)
        if field in ("threshold", "min_confidence"):
            continue  # "" is not a number: JSON refuses it by type
        by_json = client.post("/v1/classify", json={"text": "a red circle", field: ""})
        assert by_json.status_code == 422, (field, by_json.text)
        assert field in by_form.json()["error"]["message"]
    empty_image = client.post("/v1/classify", files={"image": ("a.png", b"", "image/png")}, data={"text": "a"})
    assert empty_image.status_code == 422
    assert client.post("/v1/classify", json={"image": "", "text": "a"}).status_code == 422


def test_an_empty_model_name_is_a_422_that_says_to_leave_it_out(client):
    for response in (
        client.post("/v1/classify", data={"text": "a red circle", "model": ""}),
        client.post("/v1/classify", json={"text": "a red circle", "model": ""}),
        client.post("/v1/classify/batch", json={"inputs": [{"text": "a"}], "model": " "}),
    ):
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert "leave it out" in message
        assert "models//load" not in message


def test_an_unknown_model_does_not_suggest_a_load_the_server_refuses(client):
    message = client.post("/v1/classify", json={"text": "a", "model": "other"}).json()["error"]["message"]
    assert "unknown model 'other'" in message
    assert "/load" not in message  # model control is off by default: a load would be a 403


def test_form_fields_are_bounded_while_the_form_is_read(client):
    too_long = client.post("/v1/classify", data={"text": "é" * 5000})  # 10,000 bytes: over 4 x 2000 + 64
    assert too_long.status_code == 413
    many = "&".join(f"f{i}=x" for i in range(20_000)).encode()
    started = time.perf_counter()
    refused = client.post("/v1/classify", content=many, headers={"content-type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 422
    assert time.perf_counter() - started < 5
    parts = multipart({f"f{i}": "x" for i in range(5000)}, None)
    assert client.post("/v1/classify", content=parts, headers=MULTIPART).status_code == 422


def v2_text(data, **fields) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(data)], "data": data, **fields}]}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"inputs": [{"text": "a"}] * 65}, "inputs"),
        ({"inputs": [{}] * 100_000}, "inputs"),
    ],
)
def test_batch_counts_are_refused_before_parsing(client, body, where):
    response = client.post("/v1/classify/batch", json=body)
    assert response.status_code == 413
    assert f"{where}: over the limit of 64" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (v2_text(["a"] * 65), "inputs[0].data"),
        (v2_text(["a"] * 200_000), "inputs[0].data"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1] * 100, "data": ["a"]}]}, "inputs[0].shape"),
        ({**v2_text(["a"]), "outputs": [{"name": "label"}] * 1000}, "outputs"),
        ({**v2_text(["a"]), "parameters": {f"p{i}": i for i in range(5000)}}, "values"),
        (v2_text([[[["a"] * 60] * 60]]), "values"),  # arrays of arrays, each within the limit
    ],
)
def test_v2_json_counts_are_refused_before_parsing(client, body, where):
    response = client.post(INFER, json=body)
    assert response.status_code == 413, response.text
    message = response.json()["error"]
    assert where in message if where != "values" else "values" in message


def test_v2_binary_elements_are_split_no_further_than_the_shape(client):
    elements = struct.pack("<I", 0) * 2_000_000  # 8 MB of empty elements
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(elements)}}
            ]
        }
    )
    started = time.perf_counter()
    response = client.post(
        INFER,
        content=header.encode() + elements,
        headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "holds 1 element(s) but more than 1 were sent" in response.json()["error"]
    assert time.perf_counter() - started < 5


def test_repository_bodies_are_bounded_too(serve):
    client = serve(model_control="explicit")
    body = {"parameters": {f"p{i}": [1] * 60 for i in range(100)}}
    assert client.post("/v2/repository/models/shapes/load", json=body).status_code == 413
    assert client.post("/v2/repository/index", json={"ready": [True] * 1000}).status_code == 413


def test_a_v2_shape_of_whole_numbers_written_as_floats_is_a_shape(client):
    """JSON Schema's integer (the document's type for shape) admits 1.0 and 1e0: the server does too."""
    for shape in ([1], [1.0], [1e0]):
        response = client.post(
            INFER, json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": ["a"]}]}
        )
        assert response.status_code == 200, (shape, response.text)
    for shape in ([1.5], [True], ["1"]):
        response = client.post(
            INFER, json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": ["a"]}]}
        )
        assert response.status_code == 400, (shape, response.text)
