"""The Open Inference Protocol (KServe v2 REST) over the served model, so Triton and KServe clients
(``tritonclient.http``, the KServe SDK) work unchanged. The wire format lives in ``service/api/v2_codec.py``.

The model as a v2 model (``GET /v2/models/{name}`` lists the same):

- inputs ``image`` BYTES [N] (encoded image files: PNG, JPEG, ...) and ``text`` BYTES [N] (UTF-8);
- request parameters ``route`` ('auto', 'soft' or an expert's name), ``threshold`` (0..1),
  ``operating_point`` (a router of the model), ``min_confidence`` (0..1) and ``explain`` (boolean), as in /v1;
- outputs ``label`` BYTES [N], ``probabilities`` FP32 [N, K] (columns in the order of the metadata's
  ``labels``), ``expert`` BYTES [N], ``decided_by`` BYTES [N] (router | threshold | request |
  missing_modality, as /v1's route.decided_by), ``importance`` FP32 [N, 2] (text, image),
  ``modality_weights`` FP32 [N, 2] (text, image: /v1's route.modality_weights), ``shapley`` FP32 [N, 2]
  (only with the request parameter ``explain``: /v1's explanation.shapley), ``madds``
  INT64 [N], ``saved_ratio`` FP32 [N], ``operating_point`` BYTES [N] (the router that decided).

Decisions where the protocol leaves room:

- Missing modality: leave the input tensor out for a modality no row has; an element of zero length
  (or a blank text) is a missing modality for that row alone, as /v1's blank text. A row needs one of
  the two; when both tensors are sent their N must match.
- Images in JSON ``data`` are base64 strings (a ``data:`` URL works too): JSON strings can't carry the
  raw bytes of an image file (tritonclient's JSON mode refuses non-UTF-8 bytes). Binary data carries
  the raw file bytes. Texts are plain strings in JSON, UTF-8 bytes in binary data.
- Status codes: the protocol answers a bad request with 400, so the input errors /v1 answers with
  415 (not an image) or 422 (invalid field) are 400 here. 413 stays for everything over a limit (body,
  its decompressed size, image pixels, text length, rows per request: DYNFUSE_MAX_BATCH_INPUTS): the
  request is valid, this server's limits refuse it. 401 missing API key, 404 unknown model or version,
  503 + Retry-After while loading or when the queue is full. Every error body is ``{"error": "..."}``.
- Health (live, ready, model ready) and server metadata are open; model metadata and infer need the
  API key when one is set, as /v1. Not ready is 503 (as /readyz), which every probe reads as false.
- ``priority`` and ``timeout`` (Triton's scheduling hints) are accepted and ignored: one FIFO
  micro-batcher serves everything. Any other unknown parameter is refused, so that a typo is not
  silently ignored. Request bodies may be gzip or deflate compressed; responses are not.

Every row goes through InferenceService.prepare (the /v1 limits and checks) and the one
micro-batcher, so /v2 requests batch with /v1 requests and count in the same metrics.
"""

from __future__ import annotations

import math
from importlib import metadata

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from export.pipeline import AUTO, SOFT, PipelineInput, PipelineOutput
from models.attribution import MODALITIES
from service.admission import deadline_of
from service.api.deps import ModelsDep, SettingsDep, require_api_key
from service.api.v2_codec import (
    HEADER_LENGTH,
    DecodedRequest,
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    bytes_elements,
    check_parameters,
    decompress,
    encode_output,
    encode_response,
    inline_schema,
    parse_request,
    select_outputs,
)
from service.background import OnTheLoop
from service.config import Settings
from service.decode import decode_base64, is_blank
from service.errors import ApiError, InvalidInput, NotFound, PayloadTooLarge
from service.inference import ClientInput, InferenceService
from service.json_limits import JsonLimits
from service.schemas import (
    EXPLAIN_DESCRIPTION,
    IMPORTANCE_DESCRIPTION,
    MIN_CONFIDENCE_DESCRIPTION,
    OPERATING_POINT_DESCRIPTION,
    ROUTE_DESCRIPTION,
    THRESHOLD_DESCRIPTION,
)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
guarded = [Depends(require_api_key)]

SERVER_NAME = "dynfuse"
PLATFORM = "dynfuse"
EXTENSIONS = ["binary_tensor_data", "parameters", "model_repository"]
INPUTS = ("image", "text")
OUTPUT_DATATYPES = {
    "label": "BYTES",
    "probabilities": "FP32",
    "expert": "BYTES",
    "decided_by": "BYTES",
    "importance": "FP32",
    "modality_weights": "FP32",
    "shapley": "FP32",
    "madds": "INT64",
    "saved_ratio": "FP32",
    "operating_point": "BYTES",
}
REQUEST_PARAMETERS = {
    "route", "threshold", "operating_point", "min_confidence", "explain", "binary_data_output", "priority", "timeout",
}  # fmt: skip
# The protocol's code for a bad request; 413, 401, 404 and 503 keep their meaning.
V2_STATUS = {415: 400, 422: 400}

ERRORS = {
    status: {"model": ErrorV2, "description": description}
    for status, description in {
        400: "Malformed or invalid request (the message says what to fix)",
        401: "Missing or wrong API key (when one is configured)",
        404: "Unknown model or version",
        408: "The body did not arrive before the request's deadline",
        413: "Body, image, text or number of rows over the limits",
        431: "Request headers over the limit",
        503: "Still loading, or overloaded (Retry-After)",
        504: "Not answered before the request's deadline",
    }.items()
}

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferenceRequest)},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"Binary tensor data extension: the JSON request (its length in the "
                    f"{HEADER_LENGTH} header), then each input's binary data in input order. A BYTES element "
                    "is a 4-byte little-endian length followed by its bytes.",
                }
            },
        },
    }
}

try:
    SERVER_VERSION = metadata.version("dynfuse")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0+unknown"


# -- health and metadata -----------------------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="Server metadata")
@router.get("/", response_model=ServerMetadata, include_in_schema=False)  # the spec's spelling; tritonclient's is /v2
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live", response_model=ServerLive, summary="Liveness: the process answers")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=ServerReady,
    responses={503: {"model": ServerReady, "description": "Still loading, or loading failed"}},
    summary="Readiness: the model is loaded and warm",
)
async def ready(request: Request) -> JSONResponse:
    repository = request.app.state.repository
    served = [] if repository.starting else repository.models.values()
    if any(service.batcher.ready for service in served):  # as /readyz: some model answers (each: model ready)
        return JSONResponse({"ready": True})
    if served:
        return JSONResponse({"ready": False}, 503, headers={"Retry-After": "1"})
    return _not_ready(request, {"ready": False})


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness")
async def model_ready(request: Request, name: str) -> JSONResponse:
    return _model_ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness"
)
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return _model_ready(request, name, version)


@router.get(
    "/models/{name}", response_model=ModelMetadata, responses=ERRORS, dependencies=guarded, summary="Model metadata"
)
async def model_metadata(name: str, models: ModelsDep) -> dict:
    return _describe(models.get(name), name, None)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    dependencies=guarded,
    summary="Model metadata",
)
async def model_version_metadata(name: str, version: str, models: ModelsDep) -> dict:
    return _describe(models.get(name), name, version)


def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    repository = request.app.state.repository
    service: InferenceService | None = repository.models.get(name)
    if service is None:
        # While it loads the name is known (the store's layout), the version is not.
        if name != repository.default or not (repository.starting or request.app.state.load_error):
            repository.serving(name)  # 404 for a model not served, 503 for one loading
        return _not_ready(request, {"name": name, "ready": False})
    _check_model(service, name, version)
    if not service.batcher.ready:  # loaded, but not answering: the reason comes along (beyond the protocol)
        body = {"name": name, "ready": False, "reason": service.batcher.status()}
        return JSONResponse(body, 503, headers={"Retry-After": "1"})
    return JSONResponse({"name": name, "ready": True})


def _not_ready(request: Request, body: dict) -> JSONResponse:
    loading = request.app.state.load_error is None  # a failed load won't heal by retrying
    return JSONResponse(body, 503, headers={"Retry-After": "1"} if loading else None)


def _describe(service: InferenceService, name: str, version: str | None) -> dict:
    _check_model(service, name, version)
    model = service.model
    per_modality = [-1, len(MODALITIES)]
    shapes = {"probabilities": [-1, len(model.labels)], "importance": per_modality, "modality_weights": per_modality,
              "shapley": per_modality}  # fmt: skip
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in INPUTS],
        "outputs": [
            {"name": n, "datatype": datatype, "shape": shapes.get(n, [-1])} for n, datatype in OUTPUT_DATATYPES.items()
        ],
        "labels": list(model.labels),
    }


def _check_model(service: InferenceService, name: str, version: str | None) -> None:
    model = service.model
    if name != model.name:
        raise NotFound(f"unknown model {name!r}; this server serves {model.name!r}")
    if version is not None and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r} here; the served version is {model.version!r}")


# -- inference ---------------------------------------------------------------------------------
INFER = {
    "response_model": InferenceResponse,
    "responses": {
        200: {
            "description": "The outputs as JSON, or (binary data requested) the JSON then the outputs' bytes",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **ERRORS,
    },
    "dependencies": guarded,
    "openapi_extra": INFER_BODY,
    "summary": "Inference",
    "description": "Inputs 'image' and 'text', BYTES [N]; either may be left out (a missing modality), and an "
    "empty element is a missing modality for its row. JSON images are base64 strings; binary data carries the raw "
    f"file bytes. Request parameters: 'route': {ROUTE_DESCRIPTION} 'threshold': {THRESHOLD_DESCRIPTION} "
    f"'operating_point': {OPERATING_POINT_DESCRIPTION} 'min_confidence': {MIN_CONFIDENCE_DESCRIPTION} "
    f"'explain': {EXPLAIN_DESCRIPTION} Outputs 'importance' (FP32 [N, 2], text, image): {IMPORTANCE_DESCRIPTION} "
    "'modality_weights' (FP32 [N, 2]): DRDF's modal weights, how decisive each modality's router was for the choice "
    "of path. 'shapley' (FP32 [N, 2]): the exact Shapley values, returned only when 'explain' is true.",
}


@router.post("/models/{name}/infer", **INFER)
async def infer(request: Request, name: str, models: ModelsDep, settings: SettingsDep) -> Response:
    return await _infer(request, models.get(name), settings, name, None)


@router.post("/models/{name}/versions/{version}/infer", **INFER)
async def infer_version(
    request: Request, name: str, version: str, models: ModelsDep, settings: SettingsDep
) -> Response:
    return await _infer(request, models.get(name), settings, name, version)


async def _infer(
    request: Request, service: InferenceService, settings: Settings, name: str, version: str | None
) -> Response:
    """decode -> batch -> predict -> unbatch -> encode, as /v1; input errors answered with the v2 codes."""
    try:
        _check_model(service, name, version)
        body = decompress(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
        decoded = parse_request(
            body, request.headers.get(HEADER_LENGTH), JsonLimits.for_rows(settings.max_batch_inputs)
        )
        options = _options(service, decoded.request.parameters)
        selected = select_outputs(decoded.request, _available_outputs(decoded.request, options["explain"]))
        images, texts = _rows(decoded, settings.max_batch_inputs)
        clients = [ClientInput(image, text, **options) for image, text in zip(images, texts, strict=True)]
        items = await _prepare(service, clients)
        results = await service.classify(items, deadline_of(request))
    except ApiError as error:
        error.status = V2_STATUS.get(error.status, error.status)
        raise
    values = _output_values([result.output for result in results], service.model.madds_full)
    tensors, binary = [], []
    for output, as_binary in selected:
        tensor, raw = encode_output(output, OUTPUT_DATATYPES[output], values[output], as_binary)
        tensors.append(tensor)
        if raw is not None:
            binary.append(raw)
    header = {"model_name": service.model.name, "model_version": service.model.version}
    if decoded.request.id is not None:
        header["id"] = decoded.request.id
    response = encode_response(header | {"outputs": tensors}, binary)
    response.background = OnTheLoop(service.after_response, items, results)  # audits: once it is sent
    return response


def _options(service: InferenceService, parameters: dict) -> dict:
    """The request parameters route, threshold, operating_point, min_confidence and explain, checked once for the
    batch, as ClientInput's fields."""
    check_parameters("request", parameters, REQUEST_PARAMETERS)
    route = parameters.get("route", AUTO)
    if not isinstance(route, str) or (route not in (AUTO, SOFT) and route not in service.pipeline.experts):
        raise InvalidInput(
            f"parameter route: {route!r} is not 'auto', 'soft' or one of: {', '.join(service.pipeline.experts)}"
        )
    point = parameters.get("operating_point")
    if point is not None and (not isinstance(point, str) or point not in service.model.operating_points):
        raise InvalidInput(
            f"parameter operating_point: {point!r} is not one of: {', '.join(service.model.operating_points)}"
        )
    explain = parameters.get("explain", False)
    if not isinstance(explain, bool):
        raise InvalidInput(f"parameter explain: {explain!r} is not true or false")
    return {
        "route": route,
        "threshold": _unit(parameters, "threshold"),
        "operating_point": point,
        "min_confidence": _unit(parameters, "min_confidence"),
        "explain": explain,
    }


def _available_outputs(request, explain: bool) -> list[str]:
    """Every output, but ``shapley`` only for an explained request (it has no value otherwise)."""
    if explain:
        return list(OUTPUT_DATATYPES)
    if any(output.name == "shapley" for output in request.outputs or ()):
        raise InvalidInput("output 'shapley' needs the request parameter explain: true")
    return [name for name in OUTPUT_DATATYPES if name != "shapley"]


def _unit(parameters: dict, name: str) -> float | None:
    """A request parameter holding a number in [0, 1], or None when it is absent."""
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"parameter {name}: {value!r} is not a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise InvalidInput(f"parameter {name}: {value} is outside [0, 1]")
    return float(value)


def _rows(decoded: DecodedRequest, max_rows: int) -> tuple[list[bytes | None], list[str | None]]:
    """Per row: the image file's bytes and the text, None where that modality is missing."""
    elements: dict[str, list] = {}
    for tensor, binary in zip(decoded.request.inputs, decoded.binary, strict=True):
        if tensor.name not in INPUTS:
            raise InvalidInput(f"unknown input {tensor.name!r}; this model takes 'image' and 'text', BYTES [N]")
        if tensor.name in elements:
            raise InvalidInput(f"input {tensor.name!r} is sent twice")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype!r}; send BYTES")
        if len(tensor.shape) != 1 or tensor.shape[0] == 0:
            raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} is not [N]: one element per row, N >= 1")
        if tensor.shape[0] > max_rows:
            raise PayloadTooLarge(f"input {tensor.name!r}: {tensor.shape[0]} rows is over the limit of {max_rows}")
        elements[tensor.name] = bytes_elements(tensor, binary)
    if not elements:
        raise InvalidInput("send at least one of the inputs 'image' and 'text' (leave out only a missing modality)")
    counts = {name: len(values) for name, values in elements.items()}
    if len(set(counts.values())) > 1:
        raise InvalidInput(f"the inputs disagree on N: image has {counts['image']} rows, text {counts['text']}")
    n = next(iter(counts.values()))
    images = [_image(row, e) for row, e in enumerate(elements.get("image", [None] * n))]
    texts = [_text(row, e) for row, e in enumerate(elements.get("text", [None] * n))]
    return images, texts


def _image(row: int, element: str | bytes | None) -> bytes | None:
    if not element:  # left out, b"" or "": a missing image for this row
        return None
    if isinstance(element, str):
        return decode_base64(element, field=f"image[{row}] (JSON images are base64 strings)")
    return element


def _text(row: int, element: str | bytes | None) -> str | None:
    if isinstance(element, bytes):
        try:
            return element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"text[{row}]: not valid UTF-8") from None
    return element  # blank counts as missing: InferenceService.prepare decides, as for /v1


async def _prepare(service: InferenceService, clients: list[ClientInput]) -> list[PipelineInput]:
    items = []
    for row, client in enumerate(clients):
        if client.image is None and (client.text is None or is_blank(client.text)):
            raise InvalidInput(f"row {row} has neither an image nor a text (an empty element is a missing modality)")
        try:
            items.append(await service.prepare(client))
        except ApiError as error:
            error.message = f"row {row}: {error.message}"
            raise
    return items


def _output_values(outputs: list[PipelineOutput], madds_full: int) -> dict:
    madds = np.array([o.madds for o in outputs], dtype=np.int64)  # (N,)
    return {
        "label": [o.label for o in outputs],
        "probabilities": np.stack([o.probabilities for o in outputs]),  # (N, K), columns in model.labels order
        "expert": [o.expert for o in outputs],
        "decided_by": [o.decided_by for o in outputs],
        "importance": np.stack([o.importance for o in outputs]),  # (N, 2): text, image
        "modality_weights": np.stack([o.modality_weights for o in outputs]),  # (N, 2): text, image
        "shapley": np.stack([_shapley(o.explanation) for o in outputs]).astype(np.float32),  # (N, 2)
        "madds": madds,
        "saved_ratio": 1.0 - madds / madds_full,  # (N,)
        "operating_point": [o.operating_point for o in outputs],
    }


def _shapley(explanation: dict | None) -> np.ndarray:
    """(2,) text, image Shapley values of an explained answer (zeros for one not explained: never sent)."""
    if explanation is None:
        return np.zeros(2)
    return np.array([explanation["shapley"]["text"], explanation["shapley"]["image"]])
