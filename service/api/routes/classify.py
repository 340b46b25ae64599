"""POST /v1/classify (JSON or multipart) and POST /v1/classify/batch."""

from __future__ import annotations

import time
import uuid
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from export.pipeline import PipelineInput
from service.admission import deadline_of
from service.api.answers import AnswerResponse
from service.api.deps import ModelsDep, SettingsDep, require_api_key
from service.api.forms import MULTIPART, URLENCODED, read_form
from service.background import OnTheLoop
from service.config import Settings
from service.decode import decode_base64
from service.errors import (
    ApiError,
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    describe_validation_errors,
)
from service.inference import ClientInput
from service.json_limits import JsonLimits, check_json_limits
from service.repository import Leases
from service.schemas import (
    EXPLAIN_DESCRIPTION,
    MIN_CONFIDENCE_DESCRIPTION,
    MODEL_DESCRIPTION,
    OPERATING_POINT_DESCRIPTION,
    ROUTE_DESCRIPTION,
    THRESHOLD_DESCRIPTION,
    BatchClassifyRequest,
    BatchClassifyResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

# What every route here checks before its own work, as ``check(request, settings)``: FastAPI runs them as the router's
# dependencies, and the fast path of POST /v1/classify (service/api/fast_path.py) calls them itself.
ROUTER_CHECKS = (require_api_key,)

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(check) for check in ROUTER_CHECKS])

FORM_FIELDS = {"image", "text", "route", "threshold", "operating_point", "min_confidence", "model", "explain"}
FORM_BOOLEANS = {"true": True, "false": False}  # as the document's boolean type says, nothing looser

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed JSON or form",
        401: "Missing or wrong API key (when one is configured)",
        404: "The model asked for is not served",
        408: "The body did not arrive before the request's deadline",
        413: "Body, image, text or number of inputs over the limits",
        415: "Unsupported content type or image format",
        422: "Invalid fields, unknown route, no modality, an image that does not decode",
        431: "Request headers over the limit",
        503: "Overloaded (Retry-After) or still loading",
        504: "Not answered before the request's deadline",
    }.items()
}

CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "The image file."},
                        "text": {"type": "string", "description": "The paired text."},
                        "route": {"type": "string", "default": "auto", "description": ROUTE_DESCRIPTION},
                        "threshold": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": THRESHOLD_DESCRIPTION,
                        },
                        "operating_point": {"type": "string", "description": OPERATING_POINT_DESCRIPTION},
                        "min_confidence": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": MIN_CONFIDENCE_DESCRIPTION,
                        },
                        "model": {"type": "string", "description": MODEL_DESCRIPTION},
                        "explain": {"type": "boolean", "default": False, "description": EXPLAIN_DESCRIPTION},
                    },
                }
            },
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify one image-text pair",
    description="The router picks one expert path and only that path runs. Send JSON (base64 image) or a "
    "multipart form (image file). Either modality may be absent, not both.",
)
async def classify(request: Request, models: ModelsDep, settings: SettingsDep) -> AnswerResponse:
    return await classify_one(request, models, settings)


async def classify_one(request: Request, models: Leases, settings: Settings) -> AnswerResponse:
    """``POST /v1/classify``: the route above, and the fast path (service/api/fast_path.py) that calls it without
    FastAPI's routing and dependency injection."""
    started = time.perf_counter()
    client = await _read_classify_body(request, settings)
    service = models.get(client.model)
    item = await service.prepare(client)
    [result] = await service.classify([item], deadline_of(request))
    request_id = _request_id(request)
    return AnswerResponse(
        service.render(result, request_id, started),
        headers={"X-Request-ID": request_id},
        background=OnTheLoop(service.after_response, [item], [result]),  # audits: once the answer is sent
    )


@router.post(
    "/classify/batch",
    response_model=BatchClassifyResponse,
    responses=ERROR_RESPONSES,
    summary="Classify several image-text pairs in one call",
    description="Every input is routed on its own; outputs come back in input order with their ids.",
)
async def classify_batch(request: Request, models: ModelsDep, settings: SettingsDep) -> AnswerResponse:
    started = time.perf_counter()
    if _content_type(request) != "application/json":
        raise UnsupportedMediaType(f"content type {_content_type(request) or '(none)'!r}: send application/json")
    body = await _parse_json(request, BatchClassifyRequest, settings.max_batch_inputs)
    service = models.get(body.model)
    if len(body.inputs) > settings.max_batch_inputs:
        raise PayloadTooLarge(f"inputs: {len(body.inputs)} is over the limit of {settings.max_batch_inputs} per call")
    items: list[PipelineInput] = []
    for position, entry in enumerate(body.inputs):
        try:
            image = decode_base64(entry.image) if entry.image is not None else None
            client = ClientInput(
                image,
                entry.text,
                body.route,
                body.threshold,
                body.operating_point,
                body.min_confidence,
                explain=body.explain,
            )
            items.append(await service.prepare(client))
        except ApiError as error:
            error.message = f"inputs[{position}]: {error.message}"
            raise
    results = await service.classify(items, deadline_of(request))
    outputs = [
        service.render(result, entry.id if entry.id is not None else str(position), started)
        for position, (entry, result) in enumerate(zip(body.inputs, results, strict=True))
    ]
    return AnswerResponse(
        {"model": service.model.name, "model_version": service.model.version, "outputs": outputs},
        background=OnTheLoop(service.after_response, items, results),  # audits: once the answers are sent
    )


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_classify_body(request: Request, settings: Settings) -> ClientInput:
    content_type = _content_type(request)
    if content_type == "application/json":
        return await _read_json(request, settings.max_batch_inputs)
    if content_type in (MULTIPART, URLENCODED):  # the latter: text only
        return await _read_form(request, content_type, settings.max_text_chars)
    raise UnsupportedMediaType(
        f"content type {content_type or '(none)'!r} is not accepted: send application/json or multipart/form-data"
    )


async def _parse_json(request: Request, model: type[ModelT], max_rows: int) -> ModelT:
    """The body as ``model``: 413 when it holds more than a call may (checked before any object is built), 400
    when it is not JSON, 422 when it is JSON of the wrong shape."""
    body = await request.body()
    check_json_limits(body, JsonLimits.for_rows(max_rows))
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            raise MalformedRequest(f"body is not valid JSON: {errors[0]['msg']}") from None
        raise InvalidInput(describe_validation_errors(errors)) from None


async def _read_json(request: Request, max_rows: int) -> ClientInput:
    parsed = await _parse_json(request, ClassifyRequest, max_rows)
    image = decode_base64(parsed.image) if parsed.image is not None else None
    return ClientInput(
        image,
        parsed.text,
        parsed.route,
        parsed.threshold,
        parsed.operating_point,
        parsed.min_confidence,
        model=parsed.model,
        explain=parsed.explain,
    )


async def _read_form(request: Request, content_type: str, max_text_chars: int) -> ClientInput:
    """A form means what the same JSON means: an empty or blank ``text`` is a missing modality (as ``"text": ""``),
    any other field left empty is refused as its empty JSON string would be (an unknown route or operating point,
    an empty model name, an empty image), and a number field must hold a number."""
    # A text's characters are at most 4 bytes each in UTF-8; anything longer is over the limit whatever it says.
    form = await read_form(request, content_type, max_fields=len(FORM_FIELDS), max_field_bytes=4 * max_text_chars + 64)
    try:
        return await _client_input(form)
    finally:
        await form.close()


async def _client_input(form) -> ClientInput:
    unknown = set(form.keys()) - FORM_FIELDS
    if unknown:
        raise InvalidInput(f"unknown form fields {sorted(unknown)}; accepted: {sorted(FORM_FIELDS)}")
    repeated = sorted(name for name in FORM_FIELDS if len(form.getlist(name)) > 1)
    if repeated:
        raise InvalidInput(f"form fields {repeated} are sent more than once; send each at most once")
    image_field = form.get("image")
    if isinstance(image_field, UploadFile):
        image = await image_field.read()
    elif image_field is None:
        image = None
    else:
        raise InvalidInput("image: send it as a file part (curl -F image=@photo.png)")
    text = form.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidInput("text: must be a plain form field, not a file")
    route = form.get("route", "auto")  # an empty field is an unknown route, as in JSON: leave it out instead
    if not isinstance(route, str):
        raise InvalidInput("route: must be a plain form field")
    point = form.get("operating_point")  # empty: an unknown point, as in JSON
    if point is not None and not isinstance(point, str):
        raise InvalidInput("operating_point: must be a plain form field")
    model = form.get("model")  # empty: refused as in JSON (the repository says how)
    if model is not None and not isinstance(model, str):
        raise InvalidInput("model: must be a plain form field")
    threshold = _parse_unit("threshold", form.get("threshold"))
    min_confidence = _parse_unit("min_confidence", form.get("min_confidence"))
    explain = _parse_flag("explain", form.get("explain"))
    return ClientInput(image, text, route, threshold, point, min_confidence, model=model, explain=explain)


def _parse_flag(field: str, value) -> bool:
    """A form field holding true or false, False when it is absent."""
    if value is None:
        return False
    if isinstance(value, str) and value in FORM_BOOLEANS:
        return FORM_BOOLEANS[value]
    shown = repr(value) if isinstance(value, str) else "a file"
    raise InvalidInput(f"{field}: {shown} is not true or false; send explain=true, or leave the field out")


def _parse_unit(field: str, value) -> float | None:
    """A form field holding a number in [0, 1], or None when it is absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():  # a file part, or an empty field: leave it out instead
        raise InvalidInput(f"{field}: {value!r} is not a number in [0, 1]; to use none, leave the field out")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field}: {value!r} is not a number in [0, 1]") from None
    if not 0.0 <= number <= 1.0:  # NaN fails it too
        raise InvalidInput(f"{field}: {number} is outside [0, 1]")
    return number


def _request_id(request: Request) -> str:
    supplied = request.headers.get("x-request-id")
    return supplied[:128] if supplied else uuid.uuid4().hex
