"""The served model: loading and warming it, turning client inputs into pipeline inputs, results into responses.

Routes call this; it owns the pipeline, the micro-batcher and the metrics of one model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool

from export.backends import create_backend
from export.pipeline import AUTO, DynamicPipeline, PipelineInput, RouteError
from export.store import StoredModel, load_model
from models.policy import DECIDED_BY
from service.batcher import BatchResult, MicroBatcher
from service.config import Settings
from service.decode import check_text, decode_image
from service.errors import InvalidInput
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")

# Decoding a big image takes milliseconds: that happens in a worker thread so the event loop keeps
# serving. Small ones decode faster than the thread hop costs.
INLINE_DECODE_BYTES = 64 * 1024


async def run_decoding(image_bytes: int, fn, *args):
    """``fn(*args)``, which decodes images of ``image_bytes`` in all: on the event loop when they are
    small, in a worker thread when they are big."""
    if image_bytes > INLINE_DECODE_BYTES:
        return await run_in_threadpool(fn, *args)
    return fn(*args)


@dataclass
class ClientInput:
    """One image-text pair as the client sent it, before decoding."""

    image: bytes | None
    text: str | None
    route: str = AUTO
    threshold: float | None = None


class InferenceService:
    def __init__(self, settings: Settings, model: StoredModel, pipeline: DynamicPipeline, metrics: Metrics):
        self.settings = settings
        self.model = model
        self.pipeline = pipeline
        self.metrics = metrics
        self.batcher = MicroBatcher(
            pipeline,
            metrics,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s,
        )

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> InferenceService:
        """Load and verify the model, build the runtime, warm every served path (blocking: run it in a thread)."""
        started = time.perf_counter()
        model = load_model(settings.store, settings.model, settings.model_version)
        backend = create_backend(settings.backend, settings.device, settings.threads)
        pipeline = DynamicPipeline(model, backend)
        pipeline.warmup(batch_sizes=(1, settings.max_batch_size))
        metrics.set_model_info(model.version, backend.name, backend.device)
        metrics.init_routes(pipeline.experts, DECIDED_BY)
        logger.info(
            "loaded %s v%s (%s) and warmed it in %.1f s",
            model.name,
            model.version,
            backend.describe(),
            time.perf_counter() - started,
        )
        return cls(settings, model, pipeline, metrics)

    # -- request path: decode -> batch -> predict -> unbatch -> encode ---------------------------
    def prepare(self, client: ClientInput) -> PipelineInput:
        """Decode and check one input (raises a 4xx ApiError on bad input)."""
        text = check_text(client.text, max_chars=self.settings.max_text_chars)
        image = (
            decode_image(client.image, max_pixels=self.settings.max_image_pixels) if client.image is not None else None
        )
        if text is None and image is None:
            raise InvalidInput("send an image, a text or both; this request has neither")
        try:
            self.pipeline.check_route(client.route, text is not None, image is not None)
        except RouteError as error:
            raise InvalidInput(str(error)) from None
        return self.pipeline.prepare(text, image, client.route, client.threshold)

    async def classify(self, items: list[PipelineInput]) -> list[BatchResult]:
        results = await self.batcher.submit(items)
        for result in results:
            out = result.output
            self.metrics.observe_prediction(
                expert=out.expert,
                decided_by=out.decided_by,
                madds=out.madds,
                madds_full=self.model.madds_full,
                importance=out.importance,
            )
        return results

    def render(self, result: BatchResult, request_id: str, started: float) -> dict:
        """The v1 response body of one result (DESIGN.md's contract)."""
        out = result.output
        madds_full = self.model.madds_full
        return {
            "id": request_id,
            "model": self.model.name,
            "model_version": self.model.version,
            "label": out.label,
            "scores": {
                label: round(float(p), 6) for label, p in zip(self.model.labels, out.probabilities, strict=True)
            },
            "route": {
                "expert": out.expert,
                "decided_by": out.decided_by,
                "scores": {e: round(float(s), 6) for e, s in zip(self.pipeline.experts, out.route_scores, strict=True)},
            },
            "importance": {"text": round(float(out.importance[0]), 6), "image": round(float(out.importance[1]), 6)},
            "compute": {
                "madds": out.madds,
                "madds_full": madds_full,
                "saved_ratio": round(1.0 - out.madds / madds_full, 6),
            },
            "timing_ms": {
                "queue": round(1000 * result.queue_seconds, 3),
                "inference": round(1000 * result.inference_seconds, 3),
                "total": round(1000 * (time.perf_counter() - started), 3),
            },
        }

    def describe(self) -> dict:
        """GET /v1/models/{name}."""
        manifest = self.model.manifest
        return {
            "name": self.model.name,
            "version": self.model.version,
            "labels": list(self.model.labels),
            "experts": [
                {k: e[k] for k in ("name", "modalities", "components", "madds", "path_madds")}
                for e in manifest["experts"]
            ],
            "full_expert": self.model.full_expert,
            "router": manifest["router"],
            "madds_full": self.model.madds_full,
            "backend": self.pipeline.backend.name,
            "device": self.pipeline.backend.device,
            "preprocessing": manifest["preprocessing"],
            "evaluation": manifest.get("evaluation", {}).get("summary", {}),
            "examples": [
                {
                    **{k: e.get(k) for k in ("id", "kind", "text", "label")},
                    "image_url": f"/v1/models/{quote(self.model.name)}/examples/{quote(e['id'], safe='')}",
                }
                for e in manifest.get("examples", [])
            ],
        }
