"""Route dependencies as ``Annotated`` aliases, so signatures stay short and tests can override them.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, and
three thread hops per request were the largest cost of the HTTP path (bench/BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from service.admission import KEY_NAME_KEY
from service.auth import AccessPolicy
from service.config import Settings
from service.inference import InferenceService
from service.middleware import raw_header
from service.repository import Leases, ModelRepository


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_models(request: Request) -> AsyncIterator[Leases]:
    """The served models, for this request: each version it uses is held until the request ends, so that a
    swap meanwhile lets it finish on that version (service/repository.py)."""
    leases = request.app.state.repository.leases()
    try:
        yield leases
    finally:
        leases.release()


ModelsDep = Annotated[Leases, Depends(get_models)]


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]


async def get_service(models: ModelsDep) -> InferenceService:
    """The default model (the one a request without ``model`` gets)."""
    return models.get(None)


ServiceDep = Annotated[InferenceService, Depends(get_service)]


def _authorization(request: Request) -> bytes | None:
    """The Authorization header as sent (bytes: a key's characters are compared as the client sent them)."""
    return raw_header(request.scope, b"authorization")


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Inference calls and model metadata: an inference key when any is configured (service/auth.py). ``settings``
    is unused: every route check takes ``(request, settings)`` (the fast path calls them so)."""
    access: AccessPolicy = request.app.state.access
    if not access.keys_required:
        return
    if KEY_NAME_KEY in request.scope:  # admission identified the key already (for the metrics)
        if request.scope[KEY_NAME_KEY] is None:
            access.check_inference(None)  # raises the 401
        return
    access.check_inference(_authorization(request))


async def require_index_access(request: Request) -> None:
    """The repository index: any valid key (inference or admin) when inference keys are configured."""
    request.app.state.access.check_index(_authorization(request))


async def require_model_control(request: Request) -> None:
    """Load and unload: DYNFUSE_MODEL_CONTROL=explicit, and the admin key when one is set."""
    request.app.state.access.check_control(_authorization(request))
