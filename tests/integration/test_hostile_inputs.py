"""Hostile requests of every shape get a 4xx, never a 5xx: odd content types, mutated multipart bodies, JSON
of every wrong type (NaN and Infinity included), odd headers, and /v2 requests with binary data that
lies about its sizes, on every operation of the API that takes a body (the model repository's included, with model
control on: a test proves none is left out). Seeded, so a failure names a reproducible case."""

from __future__ import annotations

import json
import random

import pytest
from conftest import b64, png_of_size

PATHS = ("/v1/classify", "/v1/classify/batch", "/v2/models/shapes/infer", "/v2/models/shapes/versions/1/infer")
# Model control on (explicit, loopback: no admin key), so the bodies reach the parser. The load names the version
# served (nothing to warm); the unload a model the store lacks, so the model under fuzz stays served.
REPOSITORY_PATHS = ("/v2/repository/index", "/v2/repository/models/shapes/load", "/v2/repository/models/nope/unload")
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-16",
    "APPLICATION/JSON",
    "application/json;;;",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    'multipart/form-data; boundary="unclosed',
    "multipart/mixed; boundary=x",
    "application/x-www-form-urlencoded",
    "application/octet-stream",
    "text/plain",
    "image/png",
    "*/*",
    "",
    "\x00",
    "application/json\r\nx-injected: 1",
]
WRONG_VALUES = [
    None,
    True,
    0,
    -1,
    10**40,
    1e308,
    float("nan"),
    float("inf"),
    "",
    " ",
    "\x00",
    "NaN",
    "😀" * 50,
    [],
    [None],
    [[[]]],
    {},
    {"a": {"b": {}}},
]


def wrong_json_bodies(
    rng: random.Random, png: str, templates: list[dict] | None = None, count: int = 120
) -> list[bytes]:
    bodies = [b"NaN", b"Infinity", b"-Infinity", b"[]", b"null", b'"text"', b"1e999", b"{" * 5000 + b"}" * 5000]
    templates = templates or [
        {"image": png, "text": "a red circle", "route": "auto", "threshold": 0.5},
        {"inputs": [{"id": "1", "image": png, "text": "a"}], "route": "auto", "threshold": 0.5},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "parameters": {}},
    ]
    for _ in range(count):
        body = json.loads(json.dumps(rng.choice(templates)))
        target = body
        while isinstance(target, dict) and target and rng.random() < 0.6:
            key = rng.choice(list(target))
            if isinstance(target[key], list) and target[key] and isinstance(target[key][0], dict):
                target = target[key][0]
            elif isinstance(target[key], dict):
                target = target[key]
            else:
                break
        if isinstance(target, dict) and target:
            target[rng.choice(list(target))] = rng.choice(WRONG_VALUES)
        bodies.append(json.dumps(body, allow_nan=True).encode())
    return bodies


def multipart_body(png: bytes, boundary: str = "XyZ") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\na red circle\r\n--{boundary}--\r\n'
        ).encode()
    )


def mutated(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.randrange(4)
        position = rng.randrange(len(out))
        if choice == 0:
            out[position] = rng.randrange(256)
        elif choice == 1:
            del out[position:]
        elif choice == 2:
            out[position:position] = rng.choice([b"\r\n", b"--XyZ", b'"', b";", b"\x00", b"--XyZ--\r\n"])
        else:
            del out[position : position + rng.randint(1, 20)]
        if not out:
            break
    return bytes(out)


@pytest.fixture
def client(serve):
    return serve(max_body_bytes=256 * 1024, max_batch_inputs=8)


def assert_no_5xx(client, cases) -> int:
    seen = 0
    for path, content, headers in cases:
        response = client.post(path, content=content, headers=headers)
        assert response.status_code < 500, (path, headers, content[:200], response.status_code, response.text[:300])
        assert response.status_code == 200 or response.json()["error"], (path, response.text[:300])
        seen += 1
    return seen


def test_odd_content_types_on_every_inference_path(client):
    png = b64(png_of_size(8, 8))
    body = json.dumps({"image": png, "text": "a red circle"}).encode()
    cases = [(path, body, {"content-type": kind}) for path in PATHS for kind in CONTENT_TYPES if "\r" not in kind]
    assert assert_no_5xx(client, cases) == len(PATHS) * (len(CONTENT_TYPES) - 1)


def test_json_of_every_wrong_type(client):
    rng = random.Random("dynfuse-json")
    bodies = wrong_json_bodies(rng, b64(png_of_size(8, 8)))
    cases = [(path, body, {"content-type": "application/json"}) for body in bodies for path in PATHS]
    assert assert_no_5xx(client, cases) == len(cases)


def test_mutated_multipart_bodies(client):
    rng = random.Random("dynfuse-multipart")
    valid = multipart_body(png_of_size(16, 16))
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    assert client.post("/v1/classify", content=valid, headers=headers).status_code == 200
    cases = [("/v1/classify", mutated(valid, rng), headers) for _ in range(300)]
    cases += [("/v1/classify", valid, {"content-type": f"multipart/form-data; boundary={b}"}) for b in ("", "x" * 300)]
    many_parts = b"".join(
        f'--XyZ\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'.encode() for i in range(2000)
    )
    cases.append(("/v1/classify", many_parts + b"--XyZ--\r\n", headers))
    assert assert_no_5xx(client, cases) == len(cases)


def test_odd_headers(client):
    body = json.dumps({"text": "a red circle"}).encode()
    json_type = {"content-type": "application/json"}
    cases = [
        ("/v1/classify", body, json_type | {"x-request-id": "x" * 10_000}),
        ("/v1/classify", body, json_type | {"authorization": "Bearer " + "k" * 10_000}),
        ("/v1/classify", body, json_type | {"content-encoding": "gzip"}),
        ("/v2/models/shapes/infer", body, json_type | {"content-encoding": "br"}),
        ("/v2/models/shapes/infer", body, json_type | {"inference-header-content-length": "-1"}),
        ("/v2/models/shapes/infer", body, json_type | {"inference-header-content-length": "99999999"}),
        ("/v2/models/shapes/infer", body, json_type | {"inference-header-content-length": "1e3"}),
        ("/v1/classify", body, json_type | {f"x-h{i}": "v" for i in range(500)}),
        ("/v1/classify", body, json_type | {"x-padding": "p" * 70_000}),
    ]
    assert assert_no_5xx(client, cases) == len(cases)


def test_v2_binary_data_that_lies_about_its_sizes(client):
    rng = random.Random("dynfuse-v2-binary")
    png = png_of_size(8, 8)
    element = len(png).to_bytes(4, "little") + png
    for _ in range(150):
        declared = rng.choice([0, 1, 3, len(element) - 1, len(element), len(element) + 7, 2**31])
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": declared}}
        header = json.dumps({"inputs": [tensor]}).encode()
        tail = mutated(element, rng) if rng.random() < 0.5 else element
        length = rng.choice([len(header), len(header) - 1, len(header) + 3, 0])
        response = client.post(
            "/v2/models/shapes/infer",
            content=header + tail,
            headers={"content-type": "application/octet-stream", "inference-header-content-length": str(length)},
        )
        assert response.status_code < 500, (declared, length, response.text[:300])


@pytest.fixture
def repository_client(serve):
    return serve(max_body_bytes=256 * 1024, model_control="explicit")


def test_every_operation_that_takes_a_body_is_fuzzed(client):
    """A route added to the API without a place here fails this test, rather than go unfuzzed."""
    fuzzed = {path.replace("/shapes/", "/{name}/").replace("/nope/", "/{name}/") for path in PATHS + REPOSITORY_PATHS}
    fuzzed = {path.replace("/versions/1/", "/versions/{version}/") for path in fuzzed}
    operations = {
        path for path, methods in client.get("/openapi.json").json()["paths"].items() if set(methods) & {"post", "put"}
    }
    assert operations == fuzzed


def test_repository_calls_with_odd_content_types_wrong_json_and_odd_headers(repository_client):
    rng = random.Random("dynfuse-repository")
    templates = [{"ready": True}, {"parameters": {"version": "1"}}, {"parameters": {"unload_dependents": True}}]
    bodies = [json.dumps(t).encode() for t in templates] + wrong_json_bodies(rng, "", templates, count=60)
    cases = [(path, body, {"content-type": "application/json"}) for body in bodies for path in REPOSITORY_PATHS]
    body = json.dumps({"parameters": {"version": "1"}}).encode()
    cases += [
        (path, body, {"content-type": kind}) for path in REPOSITORY_PATHS for kind in CONTENT_TYPES if "\r" not in kind
    ]
    cases += [
        (path, body, {"content-type": "application/json"} | headers)
        for path in REPOSITORY_PATHS
        for headers in (
            {"authorization": "Bearer " + "k" * 10_000},
            {"content-encoding": "gzip"},
            {f"x-h{i}": "v" for i in range(500)},
        )
    ]
    cases += [(path, mutated(body, rng), {"content-type": "application/json"}) for path in REPOSITORY_PATHS * 40]
    assert assert_no_5xx(repository_client, cases) == len(cases)
    # Still serving the model under fuzz, at the version it served.
    [entry] = [e for e in repository_client.post("/v2/repository/index").json() if e["name"] == "shapes"]
    assert (entry["state"], entry["version"]) == ("READY", "1")
