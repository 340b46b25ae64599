"""The expert deployments of each model version the ingress serves: deployed by the ingress, beside the ones
serving, and deleted once their version stops serving.

Each expert of a version is a Serve application of its own, ``<app>.<model>.v<version>.<expert>`` (its one
deployment is ``expert_<expert>``), with the options the application's args give that expert. The ingress
deploys the experts of the version it starts with, and of any version it is asked to swap to
(``/v2/repository/models/{name}/load``, or the store poll). The repository (service/repository.py) swaps only once
the new pipeline is built and warm, which it is only through experts that answer and hold that very version
(each is asked first, and each call carries the version: service/ray/experts.py); until then, and if anything
fails, the old version keeps serving. So answers never mix versions, and the ingress's own replica comes up
(and answers ``/readyz`` 503 "loading") before the experts it waits for.

A version's applications are deleted once another version of the model has replaced it and its last request
is answered. At shutdown nothing is deleted (a replacement ingress replica reuses them, as does a redeploy that
keeps the version; ``dynfuse serve --engine ray`` deletes them all when it stops). Versions no ingress serves
any more, left by a replica that died or by a redeploy with another version, are deleted by a sweep a while
after the ingress starts (``SWEEP_AFTER_S``, once the replicas they served are gone).

Refused with the reason, before anything is deployed (the repository answers a 400 and the old version serves
on): a swap when the ingress has several replicas (one of them would serve the new version and the others the
old: change the version there by redeploying with ``settings.model_version``), and experts the cluster has no
room for beside the ones serving (what they ask for and what is free is named; service/ray/sizing.py leaves room
for one swap when model control is on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from export.store import StoredModel
from service.ray.options import ExpertOptions
from service.ray.sizing import Demand, per_replica, replicas_at_start, unplaceable

logger = logging.getLogger("dynfuse")

DEPLOY_TIMEOUT_S = 300.0  # a version's experts load and warm up within this, or the load is refused
SWEEP_AFTER_S = 60.0  # Serve stops a replaced replica within its graceful shutdown (5 s): long past by then
POLL_S = 0.5


class SwapRefused(RuntimeError):
    """Another version's experts cannot be deployed here (the message says why and what to do)."""


class SwapPlan(BaseModel):
    """What the ingress knows of its application, to deploy each version's experts."""

    model: str  # the version the application was deployed with
    version: str
    ingress_replicas: int  # the most the ingress may have (its fixed count, or its autoscaling maximum)
    experts: dict[str, ExpertOptions]  # sized options of each expert of that version
    expert_defaults: ExpertOptions  # for an expert another version has and this one does not
    settings: dict[str, Any]  # the pinned settings the experts are built from (their threads are their own)


def app_prefix(app_name: str) -> str:
    return f"{app_name}."


def version_app_name(app_name: str, model: str, version: str, expert: str) -> str:
    return f"{app_prefix(app_name)}{model}.v{version}.{expert}"


class ExpertSets:
    """``handles_for(model)``: the handles of that version's expert deployments, deployed first when needed, and
    the function that releases them when the version stops serving."""

    def __init__(self, plan: SwapPlan, app_name: str):
        self.plan = plan
        self.settings = plan.settings
        self.app_name = app_name
        self._lock = threading.Lock()
        self._in_use: dict[str, str] = {}  # model -> the version whose experts were handed out last
        self._deploying: set[tuple[str, str]] = set()
        self._sweeper = threading.Timer(SWEEP_AFTER_S, self.sweep)
        self._sweeper.daemon = True
        self._sweeper.start()

    def handles_for(self, model: StoredModel) -> tuple[dict[str, Any], Callable[[], None]]:
        key = (model.name, model.version)
        if key != (self.plan.model, self.plan.version) and self.plan.ingress_replicas > 1:
            raise SwapRefused(
                f"the Ray application has up to {self.plan.ingress_replicas} ingress replicas, and a swap made on one "
                f"would leave the others on {self.plan.model} v{self.plan.version}; serve {model.name} "
                f"v{model.version} by redeploying the application with settings.model_version (dynfuse serve "
                "--engine ray --version, or serve deploy)"
            )
        with self._lock:
            self._deploying.add(key)
        try:
            handles = self._deployed(model)
        except BaseException:
            self._delete(model)
            raise
        finally:
            with self._lock:
                self._deploying.discard(key)
        with self._lock:
            self._in_use[model.name] = model.version
        return handles, lambda: self._release(model)

    def fingerprint(self, model: StoredModel, expert: str) -> str:
        """What an expert deployment is built from: a replica built otherwise is replaced, one built so reused."""
        built = {"settings": self._settings(model, expert), "options": self._options(expert).model_dump(mode="json")}
        return hashlib.sha256(json.dumps(built, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _options(self, expert: str) -> ExpertOptions:
        return self.plan.experts.get(expert, self.plan.expert_defaults)

    def _settings(self, model: StoredModel, expert: str) -> dict[str, Any]:
        threads = self.settings.get("threads") or self._options(expert).threads()
        return {**self.settings, "model": model.name, "model_version": model.version, "threads": threads}

    def _names(self, model: StoredModel) -> dict[str, str]:
        return {e: version_app_name(self.app_name, model.name, model.version, e) for e in model.expert_names}

    def _deployed(self, model: StoredModel) -> dict[str, Any]:
        """The version's expert deployments, deployed (or updated) unless the ones found were built the same way."""
        from ray import serve

        from service.ray.deployments import expert_deployment_name

        names = self._names(model)

        def handle(expert: str):
            return serve.get_deployment_handle(expert_deployment_name(expert), app_name=names[expert])

        running = _running(serve.status(), names.values())
        stale = [e for e in model.expert_names if names[e] not in running or not self._same(handle(e), model, e)]
        if stale:
            self._deploy(model, stale, names)
        return {expert: handle(expert) for expert in model.expert_names}

    def _same(self, handle, model: StoredModel, expert: str) -> bool:
        try:
            held = handle.describe.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - an application that does not answer is deployed again
            return False
        return held.get("fingerprint") == self.fingerprint(model, expert)

    def _deploy(self, model: StoredModel, experts: list[str], names: dict[str, str]) -> None:
        from ray import serve

        from service.ray.app import cluster_now, deployment_options
        from service.ray.deployments import ExpertDeployment, expert_deployment_name
        from service.ray.options import EXPERT_MAX_ONGOING

        what = f"{model.name} v{model.version}"
        present = set(serve.status().applications)
        wanted = [
            Demand(names[e], replicas_at_start(self._options(e)), per_replica(self._options(e)))
            for e in experts
            if names[e] not in present  # an update replaces replicas one by one, within what they hold
        ]
        missing = unplaceable(wanted, *cluster_now())
        if missing:
            raise SwapRefused(
                f"the cluster has no room for {what}'s experts beside the ones serving now: "
                + "; ".join(missing)
                + ". Add nodes, give the experts fewer CPUs (num_cpus in the application's args), or redeploy "
                "the application with settings.model_version"
            )
        targets = []
        for expert in experts:
            options = self._options(expert)
            application = ExpertDeployment.options(
                name=expert_deployment_name(expert), **deployment_options(options, EXPERT_MAX_ONGOING)
            ).bind(
                self._settings(model, expert),
                expert,
                options.max_batch_size,
                options.batch_wait_timeout_s,
                self.fingerprint(model, expert),
            )
            targets.append(serve.RunTarget(application, name=names[expert], route_prefix=None))
        logger.info("deploying the experts of %s: %s", what, ", ".join(names[e] for e in experts))
        serve.run_many(targets, wait_for_applications_running=False)
        self._wait_running([names[e] for e in experts], what)

    def _wait_running(self, names: list[str], what: str) -> None:
        from ray import serve

        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            states = {n: s for n, s in serve.status().applications.items() if n in names}
            failed = {n: s for n, s in states.items() if s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
            if failed:
                raise SwapRefused(
                    f"{what}'s experts failed to start: "
                    + "; ".join(f"{n}: {s.status} {s.message}".strip() for n, s in failed.items())
                )
            if len(states) == len(names) and all(s.status == "RUNNING" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise SwapRefused(f"{what}'s experts were not running after {DEPLOY_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    def _release(self, model: StoredModel) -> None:
        """The version stopped serving: delete its experts if another version of the model replaced it (not at
        shutdown, nor after an unload: a replacement replica, or a later load, uses them again)."""
        with self._lock:
            replaced = self._in_use.get(model.name) not in (None, model.version)
        if replaced and self.plan.ingress_replicas == 1:
            self._delete(model)

    def _delete(self, model: StoredModel) -> None:
        if self.plan.ingress_replicas > 1:
            return  # the other ingress replicas may use them
        from ray import serve

        for name in self._names(model).values():
            try:
                serve.delete(name, _blocking=False)
            except Exception:  # noqa: BLE001 - a failed delete leaves an idle application; say so, go on
                logger.exception("could not delete the Serve application %s", name)
        logger.info("deleting the experts of %s v%s", model.name, model.version)

    def sweep(self) -> list[str]:
        """Delete this application's expert applications of versions no ingress replica uses: not the version the
        application was deployed with, nor one this replica serves or is deploying (with several ingress
        replicas, no replica serves another version: swaps are refused there)."""
        from ray import serve

        keep_versions = {(self.plan.model, self.plan.version), *self._in_use.items(), *self._deploying}
        keep = {version_app_name(self.app_name, m, v, "") for m, v in keep_versions}
        deleted = []
        try:
            for name in serve.status().applications:
                if name.startswith(app_prefix(self.app_name)) and not any(name.startswith(k) for k in keep):
                    serve.delete(name, _blocking=False)
                    deleted.append(name)
        except Exception:  # noqa: BLE001 - the sweep is a tidy-up: never the replica's end
            logger.exception("the sweep of unused expert applications failed")
        if deleted:
            logger.info("deleted expert applications no ingress uses: %s", ", ".join(deleted))
        return deleted

    def close(self) -> None:
        self._sweeper.cancel()


def _running(status, names) -> set[str]:
    return {n for n in names if n in status.applications and status.applications[n].status == "RUNNING"}
