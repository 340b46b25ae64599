"""``create_app(settings)``: the FastAPI app. Its lifespan loads, verifies and warms the model in the
background (``/healthz`` answers at once, ``/readyz`` turns 200 when the model is warm) and, at
shutdown, lets the micro-batcher finish what it holds.

With several worker processes the load happens before start-up completes instead: a worker only
accepts connections once it is ready, so a ready answer from one worker never sends traffic to
another that is still loading.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from export.store import StoreError, resolve
from service.admission import Admission
from service.api.openapi import install_openapi
from service.api.routes import classify, docs, health, models, playground, v2
from service.config import Settings, get_settings
from service.errors import install_error_handlers
from service.inference import InferenceService, PipelineFactory
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics

logger = logging.getLogger("dynfuse")

DESCRIPTION = """
Dynamic multimodal fusion: each image-text request is routed to ONE expert path of a cost ladder (text
only, a cheap look at the image, the full image encoder, late fusion, and cross-modal experts: MI2P and
MuSE) and only that path runs. Every response says which path ran and why, how important each modality
was, and the compute it used against the full path (the model's most accurate expert).
"""


def create_app(
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
    make_pipeline: PipelineFactory | None = None,
) -> FastAPI:
    """The app. ``metrics`` and ``make_pipeline`` default to this process's own; the Ray engine (service/ray/)
    passes metrics that Ray's agent also exports and a pipeline whose experts are deployments of their own."""
    settings = settings or get_settings()
    metrics = metrics or Metrics(_model_name(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(app), name="dynfuse-load")
        if settings.workers > 1:
            await loader
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            if app.state.service is not None:
                await app.state.service.stop()
            metrics.close()

    # docs_url/redoc_url None: FastAPI's pages load their scripts from a CDN; routes/docs.py serves them offline.
    app = FastAPI(
        title="dynfuse", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.load_error = None
    app.state.make_pipeline = make_pipeline
    install_error_handlers(app, on_rejected=metrics.reject)
    # Added innermost first. Admission runs before the body limit, so that every request that may read a
    # body (or drain one) holds a place within the capacity; the metrics, outermost, count refusals too.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        metrics=metrics,
        drain_max_bytes=settings.drain_max_bytes,
        drain_timeout_s=settings.drain_timeout_s,
    )
    app.add_middleware(
        Admission,
        state=app.state,
        metrics=metrics,
        capacity=settings.capacity,
        request_timeout_s=settings.request_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(v2.router)
    app.include_router(docs.router)
    app.include_router(playground.router)
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    app.mount(playground.STATIC_URL, playground.static_files(), name="static")
    install_openapi(app, settings)
    return app


async def _load(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    try:
        if app.state.make_pipeline is None:
            service = await asyncio.to_thread(InferenceService.load, settings, app.state.metrics)
        else:
            service = await asyncio.to_thread(
                InferenceService.load, settings, app.state.metrics, app.state.make_pipeline
            )
    except Exception as error:  # noqa: BLE001 - reported by /readyz and the log; the process stays up for probes
        logger.error("cannot serve a model from %s: %s", settings.store, error)
        app.state.load_error = f"{type(error).__name__}: {error}"
        return
    service.batcher.start()
    app.state.service = service


def _model_name(settings: Settings) -> str:
    """The metrics' model label, known before the (slow) load."""
    if settings.model:
        return settings.model
    try:
        return resolve(settings.store, None, settings.model_version).parent.name
    except StoreError:
        return "unknown"
