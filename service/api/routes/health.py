"""Liveness and readiness probes, and the Prometheus scrape endpoint (all open, no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded, verified and warm",
    responses={
        503: {"description": "Still loading, loading failed, or the micro-batcher is not running (the body says why)"}
    },
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    repository = state.repository
    if repository.serving_any and not repository.starting:
        for name, service in sorted(repository.models.items()):
            if not service.batcher.running:  # loaded, but nothing would answer that model's requests now
                body = {"status": "unavailable", "model": name, "batcher": service.batcher.status()}
                return JSONResponse(body, 503, headers={"Retry-After": "1"})
        body = {"status": "ready", "models": repository.versions()}
        if state.service is not None:  # the default model, what a request without 'model' gets
            body |= {"model": state.service.model.name, "version": state.service.model.version}
        return JSONResponse(body)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, 503)
    if not repository.starting:  # every model was unloaded
        return JSONResponse({"status": "unavailable", "error": repository.not_serving}, 503)
    return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
