"""The Ray Serve application: ``build(args)`` is its entry point.

    serve run service.ray.app:build settings.store=store        # or a Serve config file (deploy/serve.yaml)
    dynfuse serve --engine ray                                    # the same, with the serve flags

The model is resolved once, here (the version pinned as ``dynfuse serve`` pins it), and each of its experts
gets a deployment named ``expert_<name>``; the ingress is named ``ingress``. A Serve config file's
``deployments:`` entries override any of these options by name, which is what ``dynfuse plan`` writes.
"""

from __future__ import annotations

import json
from typing import Any

from ray.serve import Application

from export.store import resolve
from service.config import Settings
from service.ray.deployments import ExpertDeployment, Ingress, expert_deployment_name
from service.ray.options import (
    EXPERT_MAX_ONGOING,
    GRACEFUL_SHUTDOWN_S,
    HEALTH_CHECK_PERIOD_S,
    INGRESS_MAX_ONGOING,
    AppArgs,
    DeploymentOptions,
)

APP_NAME = "dynfuse"


def build(args: AppArgs | dict[str, Any]) -> Application:
    """The application: the ingress bound to one deployment per expert of the resolved model."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = pinned_settings(args.settings)
    experts = expert_names(settings)
    unknown = set(args.experts) - set(experts)
    if unknown:
        raise ValueError(f"options for experts the model does not have: {sorted(unknown)}; it has {experts}")
    handles = {}
    for expert in experts:
        options = args.expert(expert)
        handles[expert] = ExpertDeployment.options(
            name=expert_deployment_name(expert), **deployment_options(options, EXPERT_MAX_ONGOING)
        ).bind(
            {**settings, "threads": settings.get("threads") or options.threads()},
            expert,
            options.max_batch_size,
            options.batch_wait_timeout_s,
        )
    ingress_settings = {**settings, "threads": settings.get("threads") or args.ingress.threads()}
    return Ingress.options(**deployment_options(args.ingress, INGRESS_MAX_ONGOING)).bind(ingress_settings, handles)


def pinned_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings every replica builds its ``Settings`` from: validated here, with an absolute store (a
    replica's working directory is not the caller's) and the model and version resolved once, so that every
    replica serves the same version even if a newer one is exported while they start."""
    settings = Settings(**overrides)
    path = resolve(settings.store, settings.model, settings.model_version)
    return {
        **overrides,
        "store": str(settings.store.resolve()),
        "model": path.parent.name,
        "model_version": path.name,
    }


def expert_names(settings: dict[str, Any]) -> list[str]:
    path = resolve(Settings(**settings).store, settings["model"], settings["model_version"])
    return [expert["name"] for expert in json.loads((path / "model.json").read_text())["experts"]]


def deployment_options(options: DeploymentOptions, max_ongoing: int) -> dict[str, Any]:
    scale: dict[str, Any] = (
        {"autoscaling_config": options.autoscaling_config}
        if options.autoscaling_config
        else {"num_replicas": options.num_replicas}
    )
    return {
        **scale,
        "ray_actor_options": options.ray_actor_options(),
        "max_ongoing_requests": options.max_ongoing_requests or max_ongoing,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
