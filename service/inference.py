"""The served model: loading and warming it, turning client inputs into pipeline inputs, results into responses.

Routes call this; it owns the pipeline, the image decoder, the micro-batcher and the metrics of one model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from PIL import Image

from export.backends import Backend, create_backend
from export.pipeline import AUTO, SOFT, DynamicPipeline, PipelineInput, PipelineOutput, RouteError
from export.store import StoredModel, load_model
from models.ood import uncertain_reasons
from models.policy import DECIDED_BY
from service.audit import Auditor
from service.batcher import BatchResult, MicroBatcher
from service.config import Settings, check_settings_for
from service.decode import OpenedImage, check_text, decode_image, open_image, plain_png_pixels
from service.degrade import DegradeController
from service.drift import RouteMixDrift
from service.errors import InvalidInput
from service.guard import Guard, GuardSettings
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")

# Where an image decodes is decided from its header, before any pixel is decoded: up to this many pixels
# it costs well under a millisecond and decodes on the event loop (a thread hop would cost about as
# much); bigger ones go to the decode threads, so the event loop keeps serving while they decode.
INLINE_DECODE_PIXELS = 128 * 128


PipelineFactory = Callable[[StoredModel, Backend], DynamicPipeline]


@dataclass
class ClientInput:
    """One image-text pair as the client sent it, before decoding."""

    image: bytes | None
    text: str | None
    route: str = AUTO
    threshold: float | None = None
    operating_point: str | None = None  # None: the server's default (DYNFUSE_OPERATING_POINT, else the store's)
    min_confidence: float | None = None  # None: the server's DYNFUSE_MIN_CONFIDENCE (off unless set)
    model: str | None = None  # the served model to ask; None: the default one
    explain: bool = False  # also compute the exact Shapley values of the answer over {text, image}


class ImageDecoder:
    """Decodes checked image headers into the model's pixels, inline or in a bounded pool of threads."""

    def __init__(self, pipeline: DynamicPipeline, threads: int):
        self.pipeline = pipeline
        self.side = pipeline.decode_side  # the model's image size, or a larger one its experts' specs read
        # A plain PNG at the model's side is its pixels as they are (service/decode.py), unless experts read more.
        self.plain_side = pipeline.model.preprocessing.image_size if pipeline.model.specs.decode_side is None else None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dynfuse-decode")

    def pixels_now(self, opened: OpenedImage) -> tuple[np.ndarray, np.ndarray | None]:
        """(S, S, 3) uint8 on the calling thread, and the (L, L, 3) the experts' image specs start from, if any."""
        if self.plain_side is not None:
            pixels = plain_png_pixels(opened, self.plain_side)
            if pixels is not None:
                opened.close()
                return pixels, None
        return self.pipeline.prepare_images(decode_image(opened, side=self.side))

    async def pixels(self, opened: OpenedImage) -> tuple[np.ndarray, np.ndarray | None]:
        if opened.pixels <= INLINE_DECODE_PIXELS:
            return self.pixels_now(opened)
        # Cancelled (deadline, client gone) before a thread took it, the decode never runs.
        return await asyncio.wrap_future(self._pool.submit(self.pixels_now, opened))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class InferenceService:
    def __init__(self, settings: Settings, model: StoredModel, pipeline: DynamicPipeline, metrics: Metrics):
        self.settings = settings
        self.model = model
        self.pipeline = pipeline
        self.metrics = metrics
        self.decoder = ImageDecoder(pipeline, settings.decode_threads)
        self.batcher = MicroBatcher(
            pipeline,
            metrics,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s,
            stuck_after_s=settings.request_timeout_s,
            probe=self.probe_items,
            on_batch_taken=self._queue_shrank,
        )
        self.default_point = settings.operating_point or model.default_point
        # The confidence floor served with the default point: DYNFUSE_MIN_CONFIDENCE when set, else the one the store
        # chose for its served point (model.json router.min_confidence), which goes with that point only.
        self.default_min_confidence = (
            settings.min_confidence
            if settings.min_confidence is not None or self.default_point != model.default_point
            else model.default_min_confidence
        )
        high, low = settings.water_marks
        self.degrade = DegradeController(
            settings.degrade_to,
            high_water=high,
            low_water=low,
            on_seconds=metrics.degraded_seconds.labels(metrics.model).inc,
        )
        self._init_safety()

    def _init_safety(self) -> None:
        """Audits, the guard and the drift of the route mix (DESIGN.md "Is routing still safe?")."""
        settings, model, metrics = self.settings, self.model, self.metrics
        safety = model.safety
        guard_settings = GuardSettings.of(settings, enabled=settings.guard and settings.audit_rate > 0)

        def changed(before: str, after: str, active: bool) -> None:
            metrics.guard_changes.labels(metrics.model, before, after).inc()
            metrics.guard_active.labels(metrics.model).set(1 if active else 0)

        self.guard = Guard(
            model=model.name,
            operating_point=self.default_point,
            min_confidence=self.default_min_confidence,
            safety=safety,
            settings=guard_settings,
            on_change=changed,
        )
        if settings.guard and settings.audit_rate == 0:
            self.guard.reason = "DYNFUSE_AUDIT_RATE is 0: without audits the guard sees nothing"
        self.auditor = Auditor(
            full_expert=model.full_expert,
            batcher=self.batcher,
            metrics=metrics,
            guard=self.guard,
            rate=settings.audit_rate,
        )
        self.drift = RouteMixDrift(
            self.pipeline.experts,
            {name: point.validation.get("route_mix") or {} for name, point in model.operating_points.items()},
            window=settings.drift_window,
            publish=lambda point, value: metrics.route_mix_drift.labels(metrics.model, point).set(value),
        )
        validated = {name: p["agreement"] for name, p in safety.get("operating_points", {}).items()}
        policies = (self.guard.served_policy, self.guard.safer_policy) if self.guard.safer_policy else None
        metrics.init_safety(self.pipeline.experts, model.full_expert, validated, policies, soft=SOFT)

    @classmethod
    def load(
        cls, settings: Settings, metrics: Metrics, make_pipeline: PipelineFactory = DynamicPipeline
    ) -> InferenceService:
        """Load and verify the model, build the runtime, warm every served path (blocking: run it in a thread).
        ``make_pipeline`` builds the pipeline over the loaded model (service/ray/ builds one whose experts run in
        their own deployments)."""
        started = time.perf_counter()
        model = load_model(settings.store, settings.model, settings.model_version)
        check_settings_for(model, settings)
        backend = create_backend(settings.backend, settings.device, settings.threads)
        pipeline = make_pipeline(model, backend)
        pipeline.warmup(batch_sizes=(1, settings.max_batch_size))
        metrics.init_routes(pipeline.experts, DECIDED_BY, model.operating_points, soft=SOFT)
        logger.info(
            "loaded %s v%s (%s) and warmed it in %.1f s",
            model.name,
            model.version,
            backend.describe(),
            time.perf_counter() - started,
        )
        return cls(settings, model, pipeline, metrics)

    def _queue_shrank(self, queued: int) -> None:
        """A batch left the queue: a degraded spell ends when the queue drains, not at the next request."""
        self.degrade.update(queued)

    def probe_items(self) -> list[PipelineInput]:
        """One input known to be good (a text and a plain grey picture): what the batcher runs to tell a broken
        pipeline from bad requests (service/batcher.py, "Health")."""
        side = self.pipeline.decode_side
        return [self.pipeline.prepare("a picture", Image.new("RGB", (side, side), (128, 128, 128)))]

    async def stop(self) -> None:
        """Answer everything accepted, then release the threads and what the pipeline holds."""
        await self.batcher.stop()
        self.decoder.close()
        self.degrade.close()
        await asyncio.to_thread(self.pipeline.close)

    # -- request path: decode -> batch -> predict -> unbatch -> encode ---------------------------
    def check(self, client: ClientInput) -> tuple[str | None, OpenedImage | None]:
        """The cheap checks, before any pixel is decoded (raises a 4xx ApiError on bad input): the text, the
        image's header, at least one modality, a route the request can take."""
        text = check_text(client.text, max_chars=self.settings.max_text_chars)
        opened = None
        if client.image is not None:
            opened = open_image(client.image, max_pixels=self.settings.max_image_pixels)
        if text is None and opened is None:
            raise InvalidInput("send an image, a text or both; this request has neither")
        try:
            self.pipeline.check_route(client.route, text is not None, opened is not None)
            self.pipeline.check_operating_point(client.operating_point)
            self.pipeline.check_explain(client.route, client.explain)
        except RouteError as error:
            raise InvalidInput(str(error)) from None
        return text, opened

    async def prepare(self, client: ClientInput) -> PipelineInput:
        """Check and decode one input; the image on the event loop or a decode thread, as its header says."""
        text, opened = self.check(client)
        pixels = await self.decoder.pixels(opened) if opened is not None else None
        return self._input(client, text, pixels)

    def prepare_now(self, client: ClientInput) -> PipelineInput:
        """``prepare`` entirely on the calling thread (benchmarks, tests)."""
        text, opened = self.check(client)
        return self._input(client, text, self.decoder.pixels_now(opened) if opened is not None else None)

    def _input(self, client: ClientInput, text: str | None, decoded: tuple | None) -> PipelineInput:
        pixels, spec_pixels = decoded if decoded is not None else (None, None)
        point, degraded = client.operating_point, False
        if point is None:
            # A request that names its point gets it; the others may be served cheaper while the queue is high.
            degraded = self.degrade.update(self.batcher.queued)
            point = self.degrade.operating_point if degraded else self.default_point
        min_confidence = client.min_confidence
        if min_confidence is None:  # the served policy's floor, unless the request named its point or was degraded
            served = client.operating_point is None and point == self.default_point
            min_confidence = self.default_min_confidence if served else self.settings.min_confidence
        # The guard's safer policy, for requests routed by the router that asked for no policy of their own.
        guarded = (
            self.guard.active
            and client.route == AUTO
            and client.operating_point is None
            and client.min_confidence is None
            and point == self.guard.operating_point
        )
        if guarded:
            min_confidence = self.guard.min_confidence
        return PipelineInput(
            token_ids=self.pipeline.prepare_text(text) if text is not None else None,
            image=pixels,
            route=client.route,
            threshold=client.threshold,
            operating_point=point,
            min_confidence=min_confidence,
            degraded=degraded,
            explain=client.explain,
            guarded=guarded,
            # What the experts' own preprocessing starts from, kept only when the model has such experts.
            text=text if self.model.specs.keeps_text else None,
            spec_image=spec_pixels,
        )

    async def classify(self, items: list[PipelineInput], deadline: float | None = None) -> list[BatchResult]:
        results = await self.batcher.submit(items, deadline)
        outputs = [result.output for result in results]
        reasons = self.uncertain_reasons(outputs)
        for result, reason in zip(results, reasons, strict=True):
            result.uncertain_reason = reason
        if len(outputs) > 1:
            self.metrics.observe_call(outputs, reasons, self.model.madds_full)
        else:
            [out], [reason] = outputs, reasons
            self.metrics.observe_prediction(
                expert=out.expert,
                decided_by=out.decided_by,
                madds=out.madds,
                madds_full=self.model.madds_full,
                importance=out.importance,
                modality_weights=out.modality_weights,
                operating_point=out.operating_point,
                degraded=out.degraded,
            )
            self.metrics.observe_answer(out.expert, float(out.probabilities.max()), reason)
        self._observe_router_picks(items, outputs)
        return results

    def _observe_router_picks(self, items: list[PipelineInput], outputs: list[PipelineOutput]) -> None:
        """The route mix's drift, from the router's own picks (calibration keeps the order; a fallback or an
        escalation after the pick aside) of a call's requests it routes with both modalities: one divergence per
        operating point and call, not one per request."""
        rows = [
            (out.operating_point, out.route_scores)
            for item, out in zip(items, outputs, strict=True)
            if item.route == AUTO and item.token_ids is not None and item.image is not None
        ]
        if not rows:
            return
        chosen = np.argmax(np.stack([scores for _, scores in rows]), axis=1).tolist()
        picks: dict[str, list[int]] = {}
        for (point, _), pick in zip(rows, chosen, strict=True):
            picks.setdefault(point, []).append(pick)
        for point, indices in picks.items():
            self.drift.observe_all(point, indices)

    def after_response(self, items: list[PipelineInput], results: list[BatchResult]) -> None:
        """What runs once a response was sent: the shadow audits of its answers (a background task of the
        response, so an audit never delays one)."""
        self.auditor.after_response(items, [result.output for result in results])

    def uncertain_reasons(self, outputs: list[PipelineOutput]) -> list[str | None]:
        """Why each answer is uncertain (models/ood.py), or None."""
        return uncertain_reasons(
            [out.confidence for out in outputs],
            [out.ood_pvalue for out in outputs],
            self.settings.uncertain_confidence,
            self.settings.uncertain_ood_alpha,
        )

    def render(self, result: BatchResult, request_id: str, started: float) -> dict:
        """The v1 response body of one result (DESIGN.md's contract). An array's numbers become Python floats by
        ``tolist``: the values ``float()`` gives one by one, without a NumPy scalar made for each."""
        out = result.output
        madds_full = self.model.madds_full
        return {
            "id": request_id,
            "model": self.model.name,
            "model_version": self.model.version,
            "label": out.label,
            "scores": {
                label: round(p, 6) for label, p in zip(self.model.labels, out.probabilities.tolist(), strict=True)
            },
            "route": self._route(out),
            "importance": _per_modality(out.importance),
            "importance_method": out.importance_method,
            **({"explanation": out.explanation} if out.explanation is not None else {}),
            **_uncertain(result.uncertain_reason),
            "compute": {
                "madds": out.madds,
                "madds_full": madds_full,
                "saved_ratio": round(1.0 - out.madds / madds_full, 6),
                "attribution_madds": out.attribution_madds,
            },
            "timing_ms": {
                "queue": round(1000 * result.queue_seconds, 3),
                "inference": round(1000 * result.inference_seconds, 3),
                "total": round(1000 * (time.perf_counter() - started), 3),
            },
        }

    def _route(self, out) -> dict:
        experts = self.pipeline.experts
        route = {
            "expert": out.expert,
            "decided_by": out.decided_by,
            "scores": {e: round(s, 6) for e, s in zip(experts, out.route_scores.tolist(), strict=True)},
            "modality_weights": _per_modality(out.modality_weights),
            "operating_point": out.operating_point,
            "degraded": out.degraded,
            "guarded": out.guarded,
        }
        if out.weights is not None:
            route["weights"] = {e: round(w, 6) for e, w in zip(experts, out.weights.tolist(), strict=True)}
        if out.fallback_from is not None:
            route["fallback_from"] = out.fallback_from
        return route

    def safety(self) -> dict:
        """The live state of "is routing still safe?" for GET /v1/models/{name}: the guard, the audits and the
        drift of the route mix, in this process."""
        return {
            "guard": self.guard.describe(),
            "audits": self.auditor.describe(),
            "drift": self.drift.describe(),
            "uncertain": {
                "confidence_below": self.settings.uncertain_confidence,
                "ood_alpha": self.settings.uncertain_ood_alpha if self.model.ood is not None else None,
                "calibrated": bool(self.model.safety.get("expert_temperatures")),
            },
        }

    def operating_points(self) -> list[dict]:
        """Every router of the model as a point on the accuracy/compute curve, measured on validation."""
        return [
            {
                "name": point.name,
                "lambda": point.lam,
                "temperature": point.temperature,
                "default": point.name == self.default_point,
                **{k: point.validation.get(k) for k in ("accuracy", "madds_per_sample", "saved_ratio", "route_mix")},
            }
            for point in sorted(
                self.model.operating_points.values(), key=lambda p: p.validation.get("madds_per_sample") or 0.0
            )
        ]

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
            "routes": [AUTO, SOFT, *self.pipeline.experts],
            "operating_points": self.operating_points(),
            "default_operating_point": self.default_point,
            "default_min_confidence": self.default_min_confidence,
            "degrade_to": self.degrade.operating_point,
            "madds_full": self.model.madds_full,
            "backend": self.pipeline.backend.name,
            "device": self.pipeline.backend.device,
            "preprocessing": manifest["preprocessing"],
            "evaluation": manifest.get("evaluation", {}).get("summary", {}),
            "safety": self.safety(),
            "examples": [
                {
                    **{k: e.get(k) for k in ("id", "kind", "text", "label")},
                    "image_url": f"/v1/models/{quote(self.model.name)}/examples/{quote(e['id'], safe='')}",
                }
                for e in manifest.get("examples", [])
            ],
        }


def _uncertain(reason: str | None) -> dict:
    return {"uncertain": True, "uncertain_reason": reason} if reason else {"uncertain": False}


def _per_modality(values) -> dict[str, float]:
    """(2,) text, image -> {"text": ..., "image": ...}, rounded as every figure of a response."""
    text, image = values.tolist() if isinstance(values, np.ndarray) else values
    return {"text": round(float(text), 6), "image": round(float(image), 6)}
