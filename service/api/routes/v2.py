"""The Open Inference Protocol (KServe v2 REST) over the served model, so Triton and KServe clients
(``tritonclient.http``, the KServe SDK) work unchanged. The wire format lives in ``service/api/v2_codec.py``; the
model as a v2 model (its tensors, parameters and checks, shared with the gRPC binding) in ``service/api/v2_model.py``.

Decisions where the protocol leaves room over HTTP:

- Images in JSON ``data`` are base64 strings (a ``data:`` URL works too): JSON strings can't carry the
  raw bytes of an image file (tritonclient's JSON mode refuses non-UTF-8 bytes). Binary data carries
  the raw file bytes. Texts are plain strings in JSON, UTF-8 bytes in binary data.
- Status codes: 400 for every bad request (v2_model.V2_STATUS). 413 stays for everything over a limit (body,
  its decompressed size, image pixels, text length, rows per request: DYNFUSE_MAX_BATCH_INPUTS): the
  request is valid, this server's limits refuse it. 401 missing API key, 404 unknown model or version,
  503 + Retry-After while loading or when the queue is full. Every error body is ``{"error": "..."}``.
- Health (live, ready, model ready) and server metadata are open; model metadata and infer need the
  API key when one is set, as /v1. Not ready is 503 (as /readyz), which every probe reads as false.
- ``binary_data_output`` (binary tensor data extension) joins the request parameters. Request bodies may be gzip
  or deflate compressed; responses are not.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service.admission import deadline_of
from service.api import v2_model
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
    decompress,
    encode_output,
    encode_response,
    inline_schema,
    parse_request,
    select_outputs,
)
from service.api.v2_model import OUTPUT_DATATYPES, SERVER_NAME, SERVER_VERSION, InputTensor
from service.background import OnTheLoop
from service.config import Settings
from service.errors import ApiError
from service.inference import InferenceService
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

EXTENSIONS = ["binary_tensor_data", "parameters", "model_repository"]
REQUEST_PARAMETERS = v2_model.REQUEST_PARAMETERS | {"binary_data_output"}

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
    if v2_model.server_ready(repository):
        return JSONResponse({"ready": True})
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
    return v2_model.describe(models.get(name), name, None)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    dependencies=guarded,
    summary="Model metadata",
)
async def model_version_metadata(name: str, version: str, models: ModelsDep) -> dict:
    return v2_model.describe(models.get(name), name, version)


def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    repository = request.app.state.repository
    if v2_model.model_ready(repository, name, version):
        return JSONResponse({"name": name, "ready": True})
    service: InferenceService | None = repository.models.get(name)
    if service is not None:  # loaded, but not answering: the reason comes along (beyond the protocol)
        body = {"name": name, "ready": False, "reason": service.batcher.status()}
        return JSONResponse(body, 503, headers={"Retry-After": "1"})
    return _not_ready(request, {"name": name, "ready": False})


def _not_ready(request: Request, body: dict) -> JSONResponse:
    loading = request.app.state.load_error is None  # a failed load won't heal by retrying
    return JSONResponse(body, 503, headers={"Retry-After": "1"} if loading else None)


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
    """The HTTP side of v2_model.infer: the body's tensors in, the selected outputs as JSON or binary data out."""
    try:
        v2_model.check_model(service, name, version)
        body = decompress(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
        decoded = parse_request(
            body, request.headers.get(HEADER_LENGTH), JsonLimits.for_rows(settings.max_batch_inputs)
        )
        requested = [output.name for output in decoded.request.outputs or ()]
        selected = select_outputs(decoded.request, v2_model.available_outputs(decoded.request.parameters, requested))
    except ApiError as error:
        raise v2_model.as_v2(error) from None
    parameters = decoded.request.parameters
    values, after_sent = await v2_model.infer(
        service, settings, parameters, _tensors(decoded), deadline_of(request), REQUEST_PARAMETERS
    )
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
    response.background = OnTheLoop(after_sent)  # audits: once it is sent, on the event loop
    return response


def _tensors(decoded: DecodedRequest) -> list[InputTensor]:
    return [
        InputTensor(tensor.name, tensor.datatype, tensor.shape, lambda t=tensor, b=binary: bytes_elements(t, b))
        for tensor, binary in zip(decoded.request.inputs, decoded.binary, strict=True)
    ]
