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
from service.ray.experts import ExpertWorker, RemoteExpertsPipeline, concatenate, split
from service.ray.metrics import RayMetrics

logger = logging.getLogger("dynfuse")


def expert_deployment_name(expert: str) -> str:
    return f"expert_{expert}"


INGRESS_NAME = "ingress"


@serve.deployment
class ExpertDeployment:
    """One expert of the stored model; ``run`` takes one sub-batch (tensor name -> rows) and returns its logits."""

    def __init__(self, settings: dict[str, Any], expert: str, max_batch_size: int, batch_wait_timeout_s: float):
        settings_ = Settings(**settings)
        model = load_model(settings_.store, settings_.model, settings_.model_version)
        backend = create_backend(settings_.backend, settings_.device, settings_.threads)
        self.worker = ExpertWorker(model, backend, expert)
        self.worker.warmup(batch_sizes=(1, max_batch_size))
        self.metrics = RayMetrics(model.name)
        self.duration = self.metrics.expert_duration.labels(model.name, expert)
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("expert %s of %s v%s ready (%s)", expert, model.name, model.version, backend.describe())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def run(self, sub_batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        joined, sizes = concatenate(sub_batches)
        started = time.perf_counter()
        logits = self.worker.run(joined)
        self.duration.observe(time.perf_counter() - started)
        return split(logits, sizes)


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()  # late-bound: each replica builds its app in __serve_build_asgi_app__, after __init__
class Ingress:
    """The service's FastAPI app, with a pipeline whose experts are the ``experts`` deployments."""

    def __init__(self, settings: dict[str, Any], experts: dict[str, Any]):
        self.settings = Settings(**settings)
        self.experts = experts

    def __serve_build_asgi_app__(self) -> FastAPI:
        from service.main import create_app

        def make_pipeline(model, backend) -> RemoteExpertsPipeline:
            return RemoteExpertsPipeline(model, backend, self.experts, timeout_s=self.settings.request_timeout_s)

        metrics = RayMetrics(self.settings.model or "unknown")
        return create_app(self.settings, metrics=metrics, make_pipeline=make_pipeline)
