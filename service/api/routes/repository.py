"""Triton's model repository extension over the store: ``POST /v2/repository/index``,
``POST /v2/repository/models/{name}/load`` and ``.../unload`` (service/repository.py does the work).

Bodies follow Triton's protocol, so ``tritonclient.http``'s ``get_model_repository_index``, ``load_model`` and
``unload_model`` work unchanged:

- index: an optional ``{"ready": bool}``; the answer is a list of ``{"name", "version", "state", "reason"}``
  (state READY, LOADING or UNAVAILABLE), plus ``versions``: those the store holds.
- load: an optional ``{"parameters": {...}}``. dynfuse reads one parameter, ``version`` (default: the highest
  in the store), which also rolls back to an older one. Triton's ``config`` and ``file:`` overrides are refused:
  a model is what the store verified. The answer (200) says what is served now and what it replaced.
- unload: ``unload_dependents`` is accepted and has nothing to act on (a dynfuse model has no dependents).
  The answer comes once the requests still using the model have finished.

Errors are the v2 shape, ``{"error": "..."}``: 400 for a bad body or a refused version (it does not verify,
or does not warm up: the version served before keeps serving), 404 for a model or version the store lacks.

Who may call them (service/auth.py): the index is readable in every mode (with any valid key when inference keys
are set); load and unload are refused 403 unless ``DYNFUSE_MODEL_CONTROL=explicit``, and then need the admin key
(``DYNFUSE_ADMIN_KEY``) when one is set; an inference key never suffices.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.deps import RepositoryDep, require_index_access, require_model_control
from service.api.v2_codec import ErrorV2
from service.errors import MalformedRequest
from service.json_limits import JsonLimits, check_json_limits
from service.repository import check_unload_parameters, load_version

router = APIRouter(prefix="/v2/repository", tags=["Model repository (v2)"])

INDEX_ERRORS = {
    400: {"model": ErrorV2, "description": "Malformed body"},
    401: {"model": ErrorV2, "description": "Missing or wrong key (when inference keys are configured)"},
}
ERRORS = {
    400: {"model": ErrorV2, "description": "Malformed body, or the version does not verify or warm up"},
    401: {"model": ErrorV2, "description": "Missing or wrong admin key (DYNFUSE_ADMIN_KEY, when one is set)"},
    403: {
        "model": ErrorV2,
        "description": "Model control is off (DYNFUSE_MODEL_CONTROL=none, the default) or the store is polled "
        "(DYNFUSE_MODEL_CONTROL=poll): explicit load and unload are refused",
    },
    404: {"model": ErrorV2, "description": "The store holds no such model or version"},
    409: {
        "model": ErrorV2,
        "description": "With several workers: a load or unload asked after this one (on another worker) has taken "
        "effect already and wins; every worker follows it",
    },
}


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ready: bool = Field(False, description="Only the models ready for inference.")


class RepositoryModel(BaseModel):
    name: str
    version: str = Field(..., description="The version served (READY), else the highest in the store.")
    state: str = Field(..., description="READY, LOADING or UNAVAILABLE.")
    reason: str = Field(..., description="Why it is not served, or why the version last asked for was refused.")
    versions: list[str] = Field(..., description="The versions the store holds, lowest first.")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    parameters: dict[str, Any] = Field(
        default_factory=dict, description="'version': the version to serve (default: the highest in the store)."
    )


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    parameters: dict[str, Any] = Field(default_factory=dict, description="'unload_dependents': accepted, no effect.")


class LoadResponse(BaseModel):
    name: str
    version: str = Field(..., description="The version served from now on.")
    previous_version: str | None = Field(..., description="The version it replaced, if one was served.")
    state: str = Field("READY")
    load_seconds: float = Field(..., description="Verify, warm up and swap; 0 when that version was served already.")


class UnloadResponse(BaseModel):
    name: str
    version: str | None = Field(..., description="The version unloaded; null when the model was not served.")
    state: str = Field("UNAVAILABLE")


@router.post(
    "/index",
    response_model=list[RepositoryModel],
    responses=INDEX_ERRORS,
    dependencies=[Depends(require_index_access)],
    summary="The models of the store",
)
async def index(request: Request, repository: RepositoryDep) -> list[dict]:
    body = await _body(request, RepositoryIndexRequest)
    return repository.index(ready_only=body.ready)


@router.post(
    "/models/{name}/load",
    response_model=LoadResponse,
    responses=ERRORS,
    dependencies=[Depends(require_model_control)],
    summary="Load a model, or swap the one served for another version",
    description="The version is verified and warmed beside the one served, which keeps serving meanwhile; then "
    "new requests go to it, and those already queued or running finish on the version they started on.",
)
async def load(name: str, request: Request, repository: RepositoryDep) -> dict:
    body = await _body(request, LoadRequest)
    result = await repository.load(name, load_version(body.parameters))
    return {
        "name": result.name,
        "version": result.version,
        "previous_version": result.previous_version,
        "state": "READY",
        "load_seconds": round(result.seconds, 3),
    }


@router.post(
    "/models/{name}/unload",
    response_model=UnloadResponse,
    responses=ERRORS,
    dependencies=[Depends(require_model_control)],
    summary="Stop serving a model",
    description="New requests for it get 404 at once; the answer comes when those already running have finished.",
)
async def unload(name: str, request: Request, repository: RepositoryDep) -> dict:
    body = await _body(request, UnloadRequest)
    check_unload_parameters(body.parameters)
    version = await repository.unload(name)
    return {"name": name, "version": version, "state": "UNAVAILABLE"}


async def _body(request: Request, model: type[BaseModel]):
    """The JSON body as ``model``; an empty body (tritonclient sends one for the index) is the defaults."""
    raw = await request.body()
    if not raw.strip():
        return model()
    check_json_limits(raw, JsonLimits.for_rows(request.app.state.settings.max_batch_inputs))
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise MalformedRequest(f"{where}: {first.get('msg', 'invalid')}") from None
