"""schemathesis hooks for tests/e2e/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

They supply, in generated requests, what no JSON Schema keyword can make a generator produce, and
nothing else:

- ``format: byte`` and ``format: binary`` values are image files (the API's only base64 strings and
  files are images; random bytes are answered 415 by design, and the schema says so in words);
- a /v2 infer body generated as valid data gets the cross-field rules its operation describes: each
  input once, shape = [number of elements], the same N for both inputs, a modality in every row, each
  output once, the output ``shapley`` only with the parameter ``explain``;
- a multipart body generated as invalid data is checked against the operation's schema here, and
  dropped when it is in fact valid: schemathesis checks its own invalid cases, but cannot when they
  carry a file (its validator refuses the Binary type), and then takes a mutation inside one ``anyOf``
  branch for a violation when another branch admits the result.

Requests generated as invalid data are otherwise left as generated.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request

import jsonschema_rs
import schemathesis
from hypothesis import strategies as st
from PIL import Image

MAX_ROWS = 64  # DYNFUSE_MAX_BATCH_INPUTS of the server under test (its default)


def _image(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [
    _image("PNG", (32, 32), "RGB"),
    _image("PNG", (7, 300), "P"),
    _image("JPEG", (64, 48), "RGB"),
    _image("GIF", (20, 20), "P"),
    _image("WEBP", (40, 40), "RGBA"),
    _image("BMP", (16, 16), "L"),
]

schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(image).decode() for image in IMAGES]))
schemathesis.openapi.format("binary", st.sampled_from(IMAGES))


@schemathesis.hook
def filter_case(context, case):
    meta = case.meta
    if meta is None or meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return True
    if not (case.media_type or "").startswith("multipart/form-data"):
        return True
    validator = _form_validator(case.operation.path)
    if validator is None:
        return True
    as_json = json.loads(json.dumps(case.body, default=lambda _file: "file"))  # a file part: any string
    # On the wire a list is the field repeated: none at all when empty, a plain field when it has one item.
    for name, value in list(as_json.items()):
        if isinstance(value, list) and len(value) < 2:
            if value:
                as_json[name] = value[0]
            else:
                del as_json[name]
    return not validator.is_valid(as_json)


_VALIDATORS: dict = {}


def _form_validator(path: str):
    if path not in _VALIDATORS:
        with urllib.request.urlopen(os.environ["DYNFUSE_OPENAPI_URL"], timeout=10) as response:
            document = json.load(response)
        content = document["paths"].get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        schema = content.get("multipart/form-data", {}).get("schema")
        _VALIDATORS[path] = jsonschema_rs.Draft202012Validator(schema) if schema else None
    return _VALIDATORS[path]


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    path = case.operation.path
    if path.startswith("/v2/") and path.endswith("/infer") and isinstance(case.body, dict):
        _consistent_v2(case.body)
    return case


def _flat(data: list) -> list:
    out = []
    for element in data:
        out.extend(element if isinstance(element, list) else [element])
    return out


def _consistent_v2(body: dict) -> None:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return
    by_name = {}
    for tensor in inputs:
        by_name.setdefault(tensor.get("name"), tensor)
    tensors = list(by_name.values())
    rows = min(MAX_ROWS, *(len(_flat(tensor["data"])) for tensor in tensors))
    for tensor in tensors:
        tensor["data"] = _flat(tensor["data"])[:rows]
        tensor["shape"] = [rows]
    image = by_name.get("image")
    text = by_name.get("text")
    for row in range(rows):
        has_image = image is not None and image["data"][row] != ""
        has_text = text is not None and text["data"][row].strip() != ""
        if not (has_image or has_text):
            if image is not None:
                image["data"][row] = base64.b64encode(IMAGES[0]).decode()
            else:
                text["data"][row] = "a red circle"
    body["inputs"] = tensors
    outputs = body.get("outputs")
    if isinstance(outputs, list):
        seen = {}
        for output in outputs:
            seen.setdefault(output.get("name"), output)
        body["outputs"] = list(seen.values())
        parameters = body.get("parameters")
        if "shapley" in seen and not (isinstance(parameters, dict) and parameters.get("explain") is True):
            body["parameters"] = {**(parameters or {}), "explain": True}
