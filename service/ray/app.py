"""The Ray Serve application: ``build(args)`` is its entry point.

    serve run service.ray.app:build settings.store=store        # or a Serve config file (deploy/serve.yaml)
    dynfuse serve --engine ray                                    # the same, with the serve flags

The model is resolved once, here (the version pinned as ``dynfuse serve`` pins it). The application is its
ingress (named ``ingress``), which deploys the experts of the version it serves itself, each an application of
its own (service/ray/versions.py) with the options ``args`` give it. Deployments whose ``num_cpus`` the args do
not give are sized to the cluster (service/ray/sizing.py); ``dynfuse plan --out`` writes args for a planned
cluster.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ray.serve import Application

from export.store import resolve
from service.config import Settings
from service.ray.deployments import Ingress
from service.ray.options import (
    GRACEFUL_SHUTDOWN_S,
    HEALTH_CHECK_PERIOD_S,
    INGRESS_MAX_ONGOING,
    AppArgs,
    DeploymentOptions,
)
from service.ray.sizing import demands, size_to_cluster, summary, unplaceable
from service.ray.versions import SwapPlan

APP_NAME = "dynfuse"


def build(args: AppArgs | dict[str, Any]) -> Application:
    """The application: the ingress bound to one deployment per expert of the resolved model, every deployment
    whose ``num_cpus`` is not given sized to the cluster (service/ray/sizing.py)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    return application(*prepare(args))


def build_checked(args: AppArgs) -> tuple[Application, list[str], str]:
    """``dynfuse serve --engine ray``'s application: (the application, what of it does not fit on the cluster
    now (empty when it all fits), a line saying what each deployment asks for)."""
    args, experts, pinned = prepare(args)
    wanted = demands(args, experts)
    free, total = cluster_now()
    return application(args, experts, pinned), unplaceable(wanted, free, total), summary(wanted)


def prepare(args: AppArgs) -> tuple[AppArgs, list[str], dict[str, Any]]:
    """(the arguments sized to the cluster, the model's experts, the pinned settings)."""
    settings = pinned_settings(args.settings)
    experts = expert_names(settings)
    unknown = set(args.experts) - set(experts)
    if unknown:
        raise ValueError(f"options for experts the model does not have: {sorted(unknown)}; it has {experts}")
    return sized(args, experts, Settings(**settings)), experts, settings


def application(args: AppArgs, experts: list[str], settings: dict[str, Any]) -> Application:
    """The ingress; it deploys its version's experts itself (service/ray/versions.py), from ``swap``."""
    ingress_settings = {**settings, "threads": settings.get("threads") or args.ingress.threads()}
    swap = SwapPlan(
        model=settings["model"],
        version=settings["model_version"],
        ingress_replicas=most_replicas(args.ingress),
        experts={expert: args.expert(expert) for expert in experts},
        expert_defaults=args.expert_defaults,
        settings=settings,
    )
    return Ingress.options(**deployment_options(args.ingress, INGRESS_MAX_ONGOING)).bind(
        ingress_settings, swap.model_dump(mode="json")
    )


def cluster_now() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(what each live node of the cluster has free now, what each has in all)."""
    from ray._private import state  # DeveloperAPI: the per-node figures Ray's own scheduler uses

    free = state.available_resources_per_node()
    total = state.total_resources_per_node()
    return [free.get(node, {}) for node in total], list(total.values())


def sized(args: AppArgs, experts: list[str], settings: Settings) -> AppArgs:
    """``args`` sized to the cluster's CPUs, with room for a second version's experts when the served version
    can change while serving (model control on, or the store polled)."""
    return size_to_cluster(args, experts, cluster_cpus(), expert_copies=2 if swaps_possible(settings) else 1)


def swaps_possible(settings: Settings) -> bool:
    control = getattr(settings, "model_control", None)
    if control is None:  # a build without model control: load and unload are always allowed
        return True
    return control != "none" or bool(settings.store_poll_s)


def cluster_cpus() -> float:
    """The CPUs of the cluster this process is connected to; of this machine when it is connected to none yet
    (``serve run`` builds the application before it connects: it then starts a local cluster of this machine)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0.0))
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def most_replicas(options: DeploymentOptions) -> int:
    if options.autoscaling_config:
        return int(options.autoscaling_config.get("max_replicas", 1))
    return options.num_replicas


def pinned_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings every replica builds its ``Settings`` from: validated here, with an absolute store (a
    replica's working directory is not the caller's) and the model and version resolved once, so that every
    replica serves the same version even if a newer one is exported while they start. ``host`` is the address
    clients reach the application on, Serve's proxy's: unless said, taken as reachable from anywhere (a Serve
    config's proxy listens on 0.0.0.0), so that checks of what the host exposes hold on Ray too."""
    overrides = {"host": "0.0.0.0", **overrides}
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
