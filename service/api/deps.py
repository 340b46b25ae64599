"""Route dependencies as ``Annotated`` aliases, so signatures stay short and tests can override them.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, and
three thread hops per request were the largest cost of the HTTP path (bench/BENCHMARKS.md)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import NotReady, Unauthorized
from service.inference import InferenceService


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_service(request: Request) -> InferenceService:
    service = request.app.state.service
    if service is None:
        raise NotReady("the model is still loading; retry shortly (GET /readyz answers 200 once it is ready)")
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With DYNFUSE_API_KEY set, inference endpoints need ``Authorization: Bearer <key>``."""
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
