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
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from export.store import StoreError, resolve
from service.admission import Admission
from service.api.fast_path import FastClassify
from service.api.openapi import install_openapi
from service.api.routes import classify, docs, health, models, playground, repository, v2
from service.auth import AccessPolicy
from service.config import Settings, get_settings
from service.errors import ApiError, install_error_handlers
from service.inference import PipelineFactory
from service.metrics import Metrics
from service.middleware import BodySizeLimit
from service.repository import ModelRepository
from service.repository_sync import STATE_FILE_ENV, SharedState, follow, poll_store, startup_models, supervised

logger = logging.getLogger("dynfuse")

DESCRIPTION = """
Dynamic multimodal fusion: each image-text request is routed to ONE expert path of a cost ladder (text
only, a cheap look at the image, the full image encoder, late fusion, and cross-modal experts: MI2P and
MuSE) and only that path runs. Every response says which path ran and why, how important each modality
was, and the compute it used against the full path (the model's most accurate expert).
"""


class DynfuseApp(FastAPI):
    """FastAPI with admission in front of its whole stack: an over-capacity refusal costs none of FastAPI's
    middleware, exception handling and routing (service/admission.py says why that matters)."""

    front_door: Admission | None = None
    fast_path: FastClassify | None = None  # POST /v1/classify without FastAPI's routing (service/api/fast_path.py)

    async def __call__(self, scope, receive, send) -> None:
        if self.front_door is None:
            return await super().__call__(scope, receive, send)
        return await self.front_door(scope, receive, send)

    async def behind_the_front_door(self, scope, receive, send) -> None:
        if self.fast_path is not None and self.fast_path.handles(scope):
            return await self.fast_path(scope, receive, send)
        return await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
    make_pipeline: PipelineFactory | None = None,
) -> DynfuseApp:
    """The app. ``metrics`` and ``make_pipeline`` default to this process's own; the Ray engine (service/ray/)
    passes metrics that Ray's agent also exports and a pipeline whose experts are deployments of their own."""
    settings = settings or get_settings()
    metrics = metrics or Metrics(_model_name(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(app), name="dynfuse-load")
        if settings.workers > 1:
            await loader
        grpc_server = None
        if settings.grpc_port is not None:
            from service.grpc.server import GrpcServer  # grpcio is imported only when gRPC is served

            grpc_server = app.state.grpc = GrpcServer(app)
            await grpc_server.start()
        try:
            yield
        finally:
            if grpc_server is not None:  # its calls in flight finish while the batchers still run
                await grpc_server.stop()
            for task in (loader, *app.state.background):
                task.cancel()
            await app.state.repository.stop()
            metrics.close()

    # docs_url/redoc_url None: FastAPI's pages load their scripts from a CDN; routes/docs.py serves them offline.
    app = DynfuseApp(
        title="dynfuse", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None  # the default model's served version (the repository keeps it so)
    app.state.repository = ModelRepository(settings, metrics, app.state)
    app.state.background = []  # the store poll and the following of other workers, when on
    app.state.load_error = None
    app.state.make_pipeline = make_pipeline
    app.state.grpc = None  # the gRPC server (service/grpc/), when DYNFUSE_GRPC_PORT is set
    app.state.access = AccessPolicy.from_settings(settings)  # keys and model control, for every front end
    install_error_handlers(app, on_rejected=metrics.reject)
    # Inside the front door (admission): every request that may read a body (or drain one) holds a place
    # within the capacity.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        metrics=metrics,
        drain_max_bytes=settings.drain_max_bytes,
        drain_timeout_s=settings.drain_timeout_s,
    )
    app.front_door = Admission(
        app.behind_the_front_door,
        state=app.state,
        metrics=metrics,
        capacity=settings.capacity,
        request_timeout_s=settings.request_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        retry_after_s=settings.retry_after_s,
        refusals_per_s=settings.refusals_per_s,
    )
    app.fast_path = FastClassify(app, settings, metrics)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(docs.router)
    app.include_router(playground.router)
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    app.mount(playground.STATIC_URL, playground.static_files(), name="static")
    install_openapi(app, settings)
    return app


async def _load(app: FastAPI) -> None:
    """Serve the models asked for at start, then keep them current (the store poll, the other workers)."""
    settings: Settings = app.state.settings
    repository: ModelRepository = app.state.repository
    shared = SharedState(os.environ[STATE_FILE_ENV]) if STATE_FILE_ENV in os.environ else None
    # A worker serves what its siblings serve now (the shared file), not what the settings said at start; a
    # missing or unreadable file is rebuilt by the follow loop from what is served.
    wanted = (shared.wanted() if shared else None) or startup_models(settings, repository.default)
    default_version = wanted.pop(repository.default, settings.model_version)
    try:
        await repository.load(repository.default, default_version, announce=False)
    except ApiError as error:  # reported by /readyz and the log; the process stays up for probes
        logger.error("cannot serve a model from %s: %s", settings.store, error.message)
        app.state.load_error = error.message
        return
    for name, version in wanted.items():
        try:
            await repository.load(name, version, announce=False)
        except ApiError as error:
            logger.error("cannot serve %s beside %s: %s", name, repository.default, error.message)
    repository.started = True  # ready: everything asked for at start is served (or was refused, and logged)
    metrics: Metrics = app.state.metrics
    if shared is not None:
        repository.take_ticket, repository.on_change = shared.ticket, shared.update
        loop = supervised(
            "following the other workers", lambda: follow(repository, shared), metrics.restarted("follow")
        )
        app.state.background.append(asyncio.create_task(loop, name="dynfuse-follow"))
    if settings.poll_interval_s:
        interval = settings.poll_interval_s
        poll = supervised("the store poll", lambda: poll_store(repository, interval), metrics.restarted("store_poll"))
        app.state.background.append(asyncio.create_task(poll, name="dynfuse-store-poll"))


def _model_name(settings: Settings) -> str:
    """The metrics' model label, known before the (slow) load."""
    if settings.model:
        return settings.model
    try:
        return resolve(settings.store, None, settings.model_version).parent.name
    except StoreError:
        return "unknown"
