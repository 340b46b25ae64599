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
    summary="Readiness: a served model is loaded, warm and answering",
    description="200 while at least one served model is ready (loaded, warm, its micro-batcher running and its "
    "pipeline answering); the body lists every served model with its state. With several models, one model's "
    "trouble does not take the others out of rotation: probe GET /v2/models/{name}/ready for one model.",
    responses={
        503: {
            "description": "Still loading, loading failed, no model served, or no served model answering (a "
            "pipeline whose batches all fail, a micro-batcher not running): the body says why"
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    repository = state.repository
    if repository.serving_any and not repository.starting:
        models = {name: model_state(service) for name, service in sorted(repository.models.items())}
        if not any(entry["ready"] for entry in models.values()):  # loaded, but nothing would answer now
            unavailable = {"status": "unavailable", "models": models}
            if len(models) == 1:  # the reason at the top, as before several models were served
                [(name, entry)] = models.items()
                unavailable |= {"model": name, "reason": entry["reason"], "batcher": entry["reason"]}
            return JSONResponse(unavailable, 503, headers={"Retry-After": "1"})
        body = {"status": "ready", "models": repository.versions(), "states": models}
        if state.service is not None:  # the default model, what a request without 'model' gets
            body |= {"model": state.service.model.name, "version": state.service.model.version}
        return JSONResponse(body)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, 503)
    if not repository.starting:  # every model was unloaded
        return JSONResponse({"status": "unavailable", "error": repository.not_serving}, 503)
    return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})


def model_state(service) -> dict:
    """One served model's readiness: version, ready, and the reason when it is not."""
    ready = service.batcher.ready
    return {"version": service.model.version, "ready": ready, "reason": "" if ready else service.batcher.status()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
