"""The Serve deployments: one ingress, and one deployment per expert.

- The **ingress** is the service's own FastAPI app (service/main.py's ``create_app``: every route, limit,
  error body and metric of ``dynfuse serve``), whose pipeline runs decoding, the shared encoders, the router
  and the policy here and sends each expert's sub-batch to that expert's deployment.
- An **expert** deployment loads only its expert's components and batches the sub-batches that ingress
  replicas send it (``@serve.batch``), each replica with its own count, autoscaling and resources.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve

from export.backends import create_backend
from export.store import load_model
from service.config import Settings
from service.ray.experts import ExpertWorker, RemoteExpertsPipeline, VersionMismatch, concatenate, split
from service.ray.metrics import RayMetrics
from service.ray.versions import ExpertSets, SwapPlan

logger = logging.getLogger("dynfuse")


def expert_deployment_name(expert: str) -> str:
    return f"expert_{expert}"


INGRESS_NAME = "ingress"


@serve.deployment
class ExpertDeployment:
    """One expert of one stored model version; ``run`` takes one sub-batch (tensor name -> rows) and returns its
    logits, batched with the sub-batches of other ingress batches."""

    def __init__(
        self,
        settings: dict[str, Any],
        expert: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        fingerprint: str = "",
    ):
        settings_ = Settings(**settings)
        model = load_model(settings_.store, settings_.model, settings_.model_version)
        backend = create_backend(settings_.backend, settings_.device, settings_.threads)
        self.worker = ExpertWorker(model, backend, expert)
        self.worker.warmup(batch_sizes=(1, max_batch_size))
        self.identity = {"model": model.name, "version": model.version, "expert": expert, "fingerprint": fingerprint}
        self.metrics = RayMetrics(model.name)
        self.duration = self.metrics.expert_duration.labels(model.name, expert)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("expert %s of %s v%s ready (%s)", expert, model.name, model.version, backend.describe())

    def describe(self) -> dict[str, str]:
        """Which model, version and expert this replica runs, and a digest of what it was built from."""
        return self.identity

    async def run(self, sub_batch: dict[str, np.ndarray], model: str, version: str) -> dict[str, np.ndarray]:
        """The logits of ``sub_batch``, which the ingress computed with ``model`` ``version``: never the answer of
        another version's expert (during a redeploy, an ingress and an expert replica of different versions may
        meet; the request is then refused and retried, not answered wrong)."""
        if (model, version) != (self.identity["model"], self.identity["version"]):
            raise VersionMismatch(
                f"expert {self.identity['expert']} runs {self.identity['model']} v{self.identity['version']}, "
                f"the request was routed by {model} v{version}"
            )
        return await self._batched(sub_batch)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, sub_batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        joined, sizes = concatenate(sub_batches)
        started = time.perf_counter()
        returned = self.worker.run(joined)
        self.duration.observe(time.perf_counter() - started)
        return split(returned, sizes)


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()  # late-bound: each replica builds its app in __serve_build_asgi_app__, after __init__
class Ingress:
    """The service's FastAPI app, with a pipeline whose experts are the expert deployments of its version."""

    def __init__(self, settings: dict[str, Any], swap: dict[str, Any]):
        self.settings = Settings(**settings)
        app_name = serve.get_replica_context().app_name
        self.expert_sets = ExpertSets(SwapPlan.model_validate(swap), app_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from service.main import create_app

        def make_pipeline(model, backend) -> RemoteExpertsPipeline:
            handles, release = self.expert_sets.handles_for(model)
            try:
                pipeline = RemoteExpertsPipeline(
                    model,
                    backend,
                    handles,
                    timeout_s=self.settings.request_timeout_s,
                    on_close=release,
                    hold_s=self.settings.ray_expert_hold_s,
                )
                pipeline.warmup(batch_sizes=(1, self.settings.max_batch_size))  # through the experts, here: a
                # failure releases them (the repository then refuses the version, the old one serves on)
            except BaseException:
                release()
                raise
            return pipeline

        metrics = RayMetrics(self.settings.model or "unknown")
        return create_app(self.settings, metrics=metrics, make_pipeline=make_pipeline)

    def __del__(self):
        self.expert_sets.close()
