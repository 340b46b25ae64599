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
    if state.service is not None:
        model = state.service.model
        batcher = state.service.batcher
        if not batcher.running:  # loaded, but nothing would answer a request now
            body = {"status": "unavailable", "batcher": batcher.status()}
            return JSONResponse(body, 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": model.name, "version": model.version})
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, 503)
    return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
