"""Every kind of bad input gets a 4xx with ``{"error": {"code", "message"}}``; none gets a 5xx; the server
keeps answering good requests afterwards."""

from __future__ import annotations

import struct
import zlib

import pytest
from conftest import b64, png_of_size


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: a decompression bomb's shape, without its bulk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def client(serve):
    return serve(max_body_bytes=64 * 1024, max_image_pixels=256 * 256, max_text_chars=200, max_batch_inputs=4)


def bad_requests(png: bytes) -> list[tuple[str, dict, int, str]]:
    good = {"image": b64(png), "text": "a red circle"}
    return [
        (
            "body over the limit",
            {"content": b"{" + b" " * 70_000 + b"}", "headers": {"content-type": "application/json"}},
            413,
            "payload_too_large",
        ),
        ("too many pixels", {"json": {"image": b64(png_of_size(300, 300))}}, 413, "payload_too_large"),
        ("header over our limit", {"json": {"image": b64(png_claiming(5_000, 5_000))}}, 413, "payload_too_large"),
        ("decompression bomb", {"json": {"image": b64(png_claiming(50_000, 50_000))}}, 413, "payload_too_large"),
        ("not an image", {"json": {"image": b64(b"these bytes are not a picture")}}, 415, "unsupported_media_type"),
        ("truncated image", {"json": {"image": b64(png[: len(png) // 2])}}, 422, "invalid_input"),
        ("empty image", {"json": {"image": ""}}, 422, "invalid_input"),
        ("invalid base64", {"json": {"image": "@@not base64@@"}}, 422, "invalid_input"),
        ("text over the limit", {"json": {"text": "word " * 100}}, 413, "payload_too_large"),
        ("text of the wrong type", {"json": {"text": 5}}, 422, "invalid_input"),
        ("image of the wrong type", {"json": {"image": ["a", "b"]}}, 422, "invalid_input"),
        ("unknown field", {"json": good | {"colour": "red"}}, 422, "invalid_input"),
        ("unknown route", {"json": good | {"route": "gpt"}}, 422, "invalid_input"),
        ("threshold above 1", {"json": good | {"threshold": 1.5}}, 422, "invalid_input"),
        ("threshold below 0", {"json": good | {"threshold": -0.1}}, 422, "invalid_input"),
        ("no modality", {"json": {"route": "auto"}}, 422, "invalid_input"),
        (
            "forced expert lacking its modality",
            {"json": {"text": "a red circle", "route": "late_fusion"}},
            422,
            "invalid_input",
        ),
        (
            "malformed JSON",
            {"content": b'{"text": "unclosed', "headers": {"content-type": "application/json"}},
            400,
            "malformed_request",
        ),
        ("JSON that is not an object", {"json": ["a", "list"]}, 422, "invalid_input"),
        (
            "unsupported content type",
            {"content": b"text=hi", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ("no content type", {"content": b"{}"}, 415, "unsupported_media_type"),
        ("form threshold not a number", {"data": {"text": "a red circle", "threshold": "high"}}, 422, "invalid_input"),
        ("form threshold empty", {"data": {"text": "a red circle", "threshold": ""}}, 422, "invalid_input"),
        ("form route empty", {"data": {"text": "a red circle", "route": ""}}, 422, "invalid_input"),
        ("form field twice", {"data": {"text": ["a red circle", "a blue square"]}}, 422, "invalid_input"),
        ("threshold as a string", {"json": {"text": "a red circle", "threshold": "0.5"}}, 422, "invalid_input"),
        ("threshold true", {"json": {"text": "a red circle", "threshold": True}}, 422, "invalid_input"),
        ("form unknown field", {"data": {"text": "a red circle", "colour": "red"}}, 422, "invalid_input"),
        ("form image as plain text", {"data": {"image": "not a file", "text": "a red circle"}}, 422, "invalid_input"),
        ("multipart image not an image", {"files": {"image": ("x.png", b"GIF89a? no")}}, 415, "unsupported_media_type"),
        (
            "multipart two files",
            {"files": [("image", ("a.png", png)), ("image", ("b.png", png))]},
            422,  # a field sent twice, as "form field twice"
            "invalid_input",
        ),
    ]


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(client, samples):
    png = samples[0]["png"]
    for name, request, status, code in bad_requests(png):
        response = client.post("/v1/classify", **request)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert response.json()["error"]["code"] == code, name
        assert response.json()["error"]["message"], name

    good = client.post("/v1/classify", json={"image": b64(png), "text": samples[0]["text"]})
    assert good.status_code == 200


def test_streamed_body_over_the_limit_is_refused_without_a_content_length(client):
    def chunks():
        for _ in range(40):
            yield b" " * 4096

    response = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 422),
        ({"inputs": [{"text": "a"}] * 5}, 413),
        ({"inputs": [{"text": "a"}, {"image": "@@"}]}, 422),
        ({"inputs": [{"text": "a"}], "threshold": 2}, 422),
        ({"items": []}, 422),
        (["not", "an", "object"], 422),
    ],
)
def test_bad_batches(client, body, status):
    response = client.post("/v1/classify/batch", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"inputs": [', "application/json", 400, "malformed_request"),
        (b'{"inputs": [{"text": "a"}]}', "text/plain", 415, "unsupported_media_type"),
        (b"inputs=a", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"inputs": [{"text": "a"}]}', None, 415, "unsupported_media_type"),
    ],
)
def test_batch_errors_follow_the_errors_table(client, content, content_type, status, code):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/classify/batch", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_a_bad_input_in_a_batch_is_named_by_position(client):
    response = client.post("/v1/classify/batch", json={"inputs": [{"text": "a red circle"}, {"image": "@@"}]})
    assert response.json()["error"]["message"].startswith("inputs[1]: image")


def test_unknown_paths_and_methods_use_the_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    wrong_method = client.get("/v1/classify")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
