"""The OpenAPI document says what the server enforces: each request below is valid for the document
exactly when the server serves it (and invalid exactly when it refuses it with a 4xx)."""

from __future__ import annotations

import jsonschema_rs
import pytest
from conftest import b64, png_of_size

IMAGE = b64(png_of_size(32, 32))
CLASSIFY_JSON = [
    {},
    {"image": None, "text": None},
    {"text": "   "},
    {"text": "\x1f"},
    {"text": "a red circle"},
    {"image": IMAGE},
    {"image": IMAGE, "text": "  "},
    {"image": "", "text": "a red circle"},
    {"text": "a red circle", "route": "late_fusion"},
    {"image": IMAGE, "text": "a red circle", "route": "late_fusion"},
    {"image": IMAGE, "route": "text"},
    {"text": "a red circle", "route": "text", "threshold": 1},
    {"text": "a red circle", "threshold": 1.5},
    {"text": "a red circle", "threshold": "0.5"},
    {"text": "a red circle", "route": "gpt"},
    {"text": "a red circle", "colour": "red"},
]
BATCH = [
    {"inputs": []},
    {"inputs": [{}]},
    {"inputs": [{"text": "a"}, {"image": IMAGE}]},
    {"inputs": [{"text": "a"}, {"image": IMAGE}], "route": "text"},
    {"inputs": [{"text": "a", "image": IMAGE}], "route": "late_fusion"},
    {"inputs": [{"text": "a", "id": "x" * 201}]},
]


def v2(inputs, **parameters):
    return {"inputs": inputs, **({"parameters": parameters} if parameters else {})}


def tensor(name, data):
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data}


V2 = [
    v2([]),
    v2([tensor("text", ["a red circle"])]),
    v2([tensor("text", ["a red circle"])], route="image"),
    v2([tensor("text", ["a"]), tensor("image", [IMAGE])], route="late_fusion"),
    v2([tensor("text", ["a"])], threshold=2),
    v2([tensor("text", ["a"])], colour="red"),
    v2([{"name": "text", "datatype": "FP32", "shape": [1], "data": ["a"]}]),
    v2([{"name": "embedding", "datatype": "BYTES", "shape": [1], "data": ["a"]}]),
]


def request_schema(spec: dict, path: str, media_type: str = "application/json") -> jsonschema_rs.Validator:
    schema = spec["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]
    return jsonschema_rs.Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("path", "bodies"),
    [
        ("/v1/classify", CLASSIFY_JSON),
        ("/v1/classify/batch", BATCH),
        ("/v2/models/shapes/infer", V2),
    ],
)
def test_the_schema_admits_exactly_what_the_server_serves(serve, path, bodies):
    client = serve()
    spec = client.get("/openapi.json").json()
    validator = request_schema(spec, path.replace("shapes", "{name}"))
    for body in bodies:
        status = client.post(path, json=body).status_code
        assert status in (200, 400, 413, 415, 422), (body, status)
        assert validator.is_valid(body) == (status == 200), (body, status)


def test_the_form_schemas_say_what_a_form_may_carry(serve):
    client = serve()
    spec = client.get("/openapi.json").json()
    form = request_schema(spec, "/v1/classify", "multipart/form-data")
    assert not form.is_valid({})
    assert form.is_valid({"image": "file"})
    assert not form.is_valid({"image": "file", "route": "late_fusion"})
    assert form.is_valid({"image": "file", "text": "a", "route": "late_fusion", "threshold": 0.5})
    urlencoded = request_schema(spec, "/v1/classify", "application/x-www-form-urlencoded")
    assert urlencoded.is_valid({"text": "a red circle"})
    assert not urlencoded.is_valid({"text": "a red circle", "route": "image"})
    assert client.post("/v1/classify", data={"text": "a red circle"}).status_code == 200
    assert client.post("/v1/classify", data={"text": "a red circle", "route": "image"}).status_code == 422


def test_path_values_name_the_served_model_and_version(serve, manifest):
    client = serve()
    spec = client.get("/openapi.json").json()
    parameters = {
        p["name"]: p["schema"]
        for p in spec["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]["parameters"]
    }
    assert parameters["name"]["enum"] == ["shapes"]
    assert parameters["version"]["enum"] == ["1"]
    route = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    experts = [e["name"] for e in client.get("/v1/models/shapes").json()["experts"]]
    assert route["properties"]["route"]["enum"] == ["auto", "soft", *experts]
    assert route["properties"]["operating_point"]["anyOf"][0]["enum"] == [r["name"] for r in manifest["routers"]]
    assert route["properties"]["image"]["anyOf"][0]["format"] == "byte"


def test_every_status_the_inference_routes_answer_is_documented(serve):
    spec = serve().get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/classify/batch", "/v2/models/{name}/infer"):
        documented = set(spec["paths"][path]["post"]["responses"])
        assert documented >= {"200", "400", "401", "408", "413", "431", "503", "504"}, path
