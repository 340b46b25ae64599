"""Route dependencies as ``Annotated`` aliases, so signatures stay short and tests can override them.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, and
three thread hops per request were the largest cost of the HTTP path (bench/BENCHMARKS.md)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import Unauthorized
from service.inference import InferenceService
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


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With DYNFUSE_API_KEY set, inference endpoints need ``Authorization: Bearer <key>``."""
    authorize(settings, request.headers.get("authorization"))


def authorize(settings: Settings, authorization: str | None) -> None:
    """The check of an ``Authorization`` value (an HTTP header, gRPC's ``authorization`` metadata): Unauthorized
    unless it is ``Bearer <key>`` with the API key, when one is set."""
    if settings.api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
