"""The OpenAPI document says what the server enforces, so that generated clients and fuzzers can trust it.

FastAPI's generated document knows the pydantic models, not the rules the routes check after them. The
request bodies of the inference routes are replaced here by JSON Schemas that state those rules:

- at least one modality (an image, or a text that is not blank: a blank text is a missing modality),
  and the modalities a forced ``route`` needs (``route`` is an enum of 'auto' and the served experts);
- ``threshold`` in [0, 1]; texts up to ``max_text_chars``; 1 to ``max_batch_inputs`` inputs or rows;
- images as base64 (``format: byte``) in JSON and as files (``format: binary``) in forms;
- for /v2, the model's input names, datatype BYTES, shape [N], the request parameters and outputs, and
  the served model's name and version as the only path values.

What JSON Schema cannot say is in the operation's description: an image must also decode as an image
file of an accepted format; in /v2, a tensor's ``shape`` equals its number of elements, each input is
sent once, both inputs have the same N, and each row needs a non-empty image or a non-blank text.

The experts (and so the routes) are known once the model is loaded; until then the document is built
without them and not cached.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.v2_codec import HEADER_LENGTH
from service.config import Settings
from service.decode import IMAGE_FORMATS, NOT_BLANK

AUTO = "auto"
SOFT = "soft"
IMAGE_MEDIA_TYPES = ", ".join(f"image/{name.lower()}" for name in IMAGE_FORMATS)

V1_CLASSIFY = "/v1/classify"
V1_BATCH = "/v1/classify/batch"
V2_INFER = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

BINARY_NOTE = (
    f" Binary tensor data extension (not in the schema below, which JSON Schema cannot state): send the JSON "
    f"request, then each input's raw bytes in input order, with the JSON's length in the {HEADER_LENGTH} header; "
    "such an input declares parameters.binary_data_size instead of data, and a BYTES element is a 4-byte "
    "little-endian length followed by its bytes."
)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    built_for = None  # what was served when the cached document was built: a load or swap rebuilds it

    def openapi() -> dict:
        nonlocal built_for
        served = app.state.repository.versions()
        if app.openapi_schema and built_for == served:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        service = app.state.service
        routes = _routes(service) if service is not None else None
        # Operating points are named for one model only: with several served, any name is let through.
        points = _points(service) if len(served) <= 1 else None
        exact_request_bodies(document, settings, routes, points, sorted(served) or None)
        if service is not None:
            _pin_path_values(document, service.model.name, service.model.version)
            app.openapi_schema = document  # complete now: cache it
            built_for = served
        return document

    app.openapi = openapi


def _routes(service) -> dict[str, tuple[str, ...]]:
    """Each accepted ``route`` value and the modalities it needs (auto and soft: at least one of the two)."""
    return {AUTO: (), SOFT: (), **{expert.name: tuple(expert.modalities) for expert in service.model.experts}}


def _points(service) -> list[str] | None:
    return list(service.model.operating_points) if service is not None else None


def exact_request_bodies(
    document: dict,
    settings: Settings,
    routes: dict[str, tuple[str, ...]] | None,
    points: list[str] | None = None,
    models: list[str] | None = None,
) -> None:
    """``routes`` and ``points`` are the default model's; ``models`` the served models' names (None: not known
    yet)."""
    paths = document["paths"]
    max_text = settings.max_text_chars
    classify = paths[V1_CLASSIFY]["post"]
    classify["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": classify_json(routes, max_text, points, models)},
            "multipart/form-data": {
                "schema": classify_form(routes, max_text, points, models),
                "encoding": {"image": {"contentType": IMAGE_MEDIA_TYPES}},
            },
            "application/x-www-form-urlencoded": {"schema": classify_text_form(routes, max_text, points, models)},
        },
    }
    paths[V1_BATCH]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": batch_json(routes, max_text, settings.max_batch_inputs, points, models)}
        },
    }
    for path in V2_INFER:
        operation = paths[path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": v2_request(routes, settings.max_batch_inputs, points)}},
        }
        if BINARY_NOTE not in operation.get("description", ""):
            operation["description"] = operation.get("description", "") + BINARY_NOTE


# -- /v1 ------------------------------------------------------------------------------------------
def _route_property(routes) -> dict:
    schema: dict = {
        "type": "string",
        "default": AUTO,
        "description": "'auto', 'soft' (every eligible expert, weighted) or an expert's name (forced).",
    }
    if routes is not None:
        schema["enum"] = list(routes)
    return schema


def _model_property(models: list[str] | None, *, form: bool = False) -> dict:
    """The served models by name (the default one's routes are those the document states)."""
    name: dict = {"type": "string"}
    if models is not None:
        name["enum"] = models
    description = "The served model to ask (GET /v1/models lists them); default: the server's default model."
    if form:
        return {**name, "description": description}
    return {"anyOf": [name, {"type": "null"}], "description": description}


def _threshold(*, form: bool = False) -> dict:
    number = {"type": "number", "minimum": 0, "maximum": 1}
    description = "Escalate to the full path when the router's pick scores below this (0..1)."
    if form:  # a form field is there or not: no null
        return {**number, "description": description}
    return {"anyOf": [number, {"type": "null"}], "description": description}


def _point_properties(points, *, form: bool = False) -> dict:
    """``operating_point`` (one of the model's routers, once it is loaded) and ``min_confidence`` in [0, 1]."""
    point: dict = {"type": "string", "description": "One of the model's operating points (routers)."}
    if points is not None:
        point["enum"] = list(points)
    unit = {"type": "number", "minimum": 0, "maximum": 1}
    floor = "Run the full path too when a cheaper expert's top probability is below this (0..1)."
    if form:  # a form field is there or not: no null
        return {"operating_point": point, "min_confidence": {**unit, "description": floor}}
    return {
        "operating_point": {"anyOf": [point, {"type": "null"}], "description": point["description"]},
        "min_confidence": {"anyOf": [unit, {"type": "null"}], "description": floor},
    }


def _explain() -> dict:
    return {
        "type": "boolean",
        "default": False,
        "description": "Also compute the exact Shapley values of the answer over {text, image} ('explanation'; "
        "compute.madds counts them).",
    }


def _non_null(schema: dict) -> dict:
    """The schema without its null branch: a /v2 parameter is sent or left out."""
    return next(branch for branch in schema["anyOf"] if branch.get("type") != "null") | {
        "description": schema["description"]
    }


def _image_b64(nullable: bool) -> dict:
    image = {
        "type": "string",
        "format": "byte",
        "minLength": 1,
        "contentEncoding": "base64",
        "description": f"An image file ({', '.join(IMAGE_FORMATS)}), base64-encoded (a data: URL works too).",
    }
    return {"anyOf": [image, {"type": "null"}], "description": image["description"]} if nullable else image


def _text(max_chars: int, nullable: bool) -> dict:
    text = {
        "type": "string",
        "maxLength": max_chars,
        "description": "The paired text; blank means no text (a missing modality).",
    }
    return {"anyOf": [text, {"type": "null"}], "description": text["description"]} if nullable else text


def _has(modality: str) -> dict:
    """The object carries that modality: an image, or a text that is not blank."""
    if modality == "image":
        return {"required": ["image"], "properties": {"image": {"type": "string"}}}
    return {"required": ["text"], "properties": {"text": {"type": "string", "pattern": NOT_BLANK}}}


def _needs(routes, route: str) -> dict:
    """What an input needs under ``route``: its modalities, or (auto) at least one of the two."""
    needed = routes[route]
    if not needed:
        return {"anyOf": [_has("image"), _has("text")]}
    return {"allOf": [_has(modality) for modality in needed]}


def _route_rules(routes, needs=None) -> dict:
    """One branch per route value, none of which requires ``route``: a branch's ``properties`` constrain the
    route only when it is given, and each branch's needs include 'at least one modality', so an absent
    route (auto) is valid exactly when some modality is there. (Requiring the route in a branch would make
    dropping it look like a violation to generators, when it only means 'auto'.)"""
    needs = needs or (lambda route: _needs(routes or {AUTO: ()}, route))
    if routes is None:
        return {"allOf": [needs(AUTO)]}
    return {"anyOf": [{"properties": {"route": {"const": route}}, "allOf": [needs(route)]} for route in routes]}


def _asks(route: str) -> dict:
    return {"required": ["route"], "properties": {"route": {"const": route}}}


def classify_json(routes, max_text: int, points=None, models: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": _image_b64(nullable=True),
            "text": _text(max_text, nullable=True),
            "route": _route_property(routes),
            "threshold": _threshold(),
            **_point_properties(points),
            "model": _model_property(models),
            "explain": _explain(),
        },
        **_route_rules(routes),
        "description": "At least one of image and text; a forced route needs its expert's modalities.",
    }


def classify_form(routes, max_text: int, points=None, models: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "The image file (a file part)."},
            "text": _text(max_text, nullable=False),
            "route": _route_property(routes),
            "threshold": _threshold(form=True),
            **_point_properties(points, form=True),
            "model": _model_property(models, form=True),
            "explain": _explain(),
        },
        **_route_rules(routes),
    }


def classify_text_form(routes, max_text: int, points=None, models: list[str] | None = None) -> dict:
    """A URL-encoded form carries no file: text only, and a route that needs no image."""
    route = _route_property(routes)
    if routes is not None:
        route["enum"] = [name for name, needs in routes.items() if "image" not in needs]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["text"],
        "properties": {
            "text": {**_text(max_text, nullable=False), "pattern": NOT_BLANK},
            "route": route,
            "threshold": _threshold(form=True),
            **_point_properties(points, form=True),
            "model": _model_property(models, form=True),
            "explain": _explain(),
        },
    }


def batch_json(routes, max_text: int, max_inputs: int, points=None, models: list[str] | None = None) -> dict:
    entry = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {
                "anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}],
                "description": "Echoed in the matching output; default: its position.",
            },
            "image": _image_b64(nullable=True),
            "text": _text(max_text, nullable=True),
        },
    }

    def needs(route: str) -> dict:
        return {"properties": {"inputs": {"items": _needs(routes or {AUTO: ()}, route)}}}

    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_inputs,
                "items": entry,
                "description": "Image-text pairs, answered in this order; each needs what the route needs.",
            },
            "route": _route_property(routes),
            "threshold": _threshold(),
            **_point_properties(points),
            "model": _model_property(models),
            "explain": _explain(),
        },
        **_route_rules(routes, needs),
    }


# -- /v2 ------------------------------------------------------------------------------------------
def _tensor(name: str, element: dict, max_rows: int) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": name},
            "shape": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {"type": "integer", "minimum": 1, "maximum": max_rows},
                "description": "[N]: one element per row; N equals the number of elements in data.",
            },
            "datatype": {"const": "BYTES"},
            "parameters": {"type": "object", "additionalProperties": False, "properties": {}},
            "data": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_rows,
                "items": {"anyOf": [element, {"type": "array", "items": element, "minItems": 1}]},
                "description": "The elements, row-major, flat or nested one level.",
            },
        },
    }


def v2_request(routes, max_rows: int, points=None) -> dict:
    scalar = {"type": ["string", "boolean", "integer", "number"]}
    image = {
        "type": "string",
        "format": "byte",
        "description": "An image file, base64-encoded; empty: no image for this row.",
    }
    text = {"type": "string", "description": "UTF-8 text; blank: no text for this row."}
    outputs = [
        "label",
        "probabilities",
        "expert",
        "decided_by",
        "importance",
        "modality_weights",
        "shapley",
        "madds",
        "saved_ratio",
        "operating_point",
    ]
    route = {"type": "string", "description": "'auto', 'soft' or an expert's name (forced)."}
    if routes is not None:
        route["enum"] = list(routes)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "id": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Echoed in the response."},
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "route": route,
                    "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    **{name: _non_null(schema) for name, schema in _point_properties(points).items()},
                    "explain": _explain(),
                    "binary_data_output": {"type": "boolean"},
                    "priority": {**scalar, "description": "Accepted and ignored (one FIFO batcher)."},
                    "timeout": {**scalar, "description": "Accepted and ignored."},
                },
            },
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {"anyOf": [_tensor("image", image, max_rows), _tensor("text", text, max_rows)]},
                "description": "'image' and/or 'text', BYTES [N], each at most once and with the same N; each "
                "row needs a non-empty image or a non-blank text.",
            },
            "outputs": {
                "anyOf": [
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {
                                "name": {"enum": outputs},
                                "parameters": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"binary_data": {"type": "boolean"}},
                                },
                            },
                        },
                        "description": "The outputs to return, each at most once, in this order; default: all.",
                    },
                    {"type": "null"},
                ]
            },
            "model_name": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Ignored."},
            "model_version": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Ignored."},
        },
        "allOf": [_v2_route_rules(routes)],
    }


def _v2_route_rules(routes) -> dict:
    """A forced route needs its expert's modalities in every row: that input sent, none of its elements missing."""
    if routes is None:
        return {}
    present = {
        "image": {"type": "string", "minLength": 1},
        "text": {"type": "string", "pattern": NOT_BLANK},
    }

    def full(modality: str) -> dict:
        element = present[modality]
        return {
            "required": ["name", "data"],
            "properties": {
                "name": {"const": modality},
                "data": {"items": {"anyOf": [element, {"type": "array", "items": element}]}},
            },
        }

    rules = []
    for route, needs in routes.items():
        if route not in (AUTO, SOFT):
            asks = {"required": ["parameters"], "properties": {"parameters": _asks(route)}}
            then = {"properties": {"inputs": {"allOf": [{"contains": full(modality)} for modality in needs]}}}
            rules.append({"if": asks, "then": then})
    return {"allOf": rules}


def _pin_path_values(document: dict, name: str, version: str) -> None:
    """The model paths name the served model and version: the only values that are not a 404."""
    for path, operations in document["paths"].items():
        if not path.startswith(("/v2/models/{name}", "/v1/models/{name}")):
            continue
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") != "path":
                    continue
                value = {"name": name, "version": version}.get(parameter["name"])
                if value is not None:
                    parameter["schema"] = {**copy.deepcopy(parameter.get("schema", {})), "enum": [value]}
