"""The model repository: which models are served, at which version, and changing that while serving
(Triton's repository extension: index, load, unload; the routes are in ``service/api/routes/repository.py``).

Each served model is one ``InferenceService`` per version: its own pipeline, decoder and micro-batcher.

- A load verifies the new version (the store's hashes) and warms it in a thread, beside the version being
  served, which keeps serving meanwhile. Then one assignment swaps it in: every request that asks for the
  model from then on gets the new version.
- A request holds a lease on the version it uses for its whole life (``Leases``, taken by the route
  dependency), so what is queued or in flight when the swap happens finishes on the version it started on.
  The old version is stopped once its last lease is returned, or at the latest when the longest request
  deadline has passed (its batcher then answers what is left).
- A version that fails to verify or to warm up is refused with the reason, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from export.store import ModelNotFoundError, StoreError, list_store, resolve
from service.config import Settings
from service.errors import InvalidInput, LoadRefused, MalformedRequest, NotFound, NotReady, Superseded
from service.inference import InferenceService
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")

# Triton's model states, as its repository index reports them.
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass
class LoadResult:
    name: str
    version: str
    previous_version: str | None  # the version it replaced; None when the model was not served
    seconds: float  # verify + warm up + swap; 0 when that version was already served


def load_version(parameters: dict) -> str | None:
    """The version a load asks for (its one parameter, ``version``; None: the highest in the store), from either
    transport's parameters. Triton's ``config`` and ``file:`` overrides are refused: a model is what the store
    verified."""
    unknown = sorted(set(parameters) - {"version"})
    if unknown:
        raise MalformedRequest(
            f"load parameters {unknown} are not supported: dynfuse serves a model as the store holds it "
            "(export another version instead); the only parameter is 'version'"
        )
    version = parameters.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        raise MalformedRequest(f"parameter version: {version!r} is not a version name")
    return None if version is None else str(version)


def check_unload_parameters(parameters: dict) -> None:
    """``unload_dependents`` is accepted and has nothing to act on (a dynfuse model has no dependents)."""
    unknown = sorted(set(parameters) - {"unload_dependents"})
    if unknown:
        raise MalformedRequest(f"unload parameters {unknown} are not supported; the only one is 'unload_dependents'")


class ModelRepository:
    """The served models, by name; ``state.service`` follows the default model (what a request without
    ``model`` gets)."""

    def __init__(self, settings: Settings, metrics: Metrics, state):
        self.settings = settings
        self.metrics = metrics
        self.state = state  # the app's state: ``service`` is kept equal to the default model's version
        self.default = metrics.model
        self.models: dict[str, InferenceService] = {}
        # Called with (name, version or None, ticket) after a load or unload asked for here (not one that follows
        # another worker): how the other workers hear of it (service/repository_sync.py).
        self.on_change: Callable[[str, str | None, int], object] | None = None
        # The order of control calls: a call takes a ticket when it is asked; where calls race, the one with the
        # later ticket wins (the workers share one counter: service/repository_sync.py).
        self.take_ticket: Callable[[], int] = itertools.count(1).__next__
        self._loading: set[str] = set()
        self._reasons: dict[str, str] = {}  # why a model is not served, or not at the version last asked for
        self._locks: dict[str, asyncio.Lock] = {}
        self._leases: dict[InferenceService, int] = {}
        self._drained: dict[InferenceService, asyncio.Event] = {}
        self._retiring: set[asyncio.Task] = set()
        self.started = False  # set once the models asked for at start were loaded (or failed to)

    # -- what requests use -----------------------------------------------------------------------
    def leases(self) -> Leases:
        return Leases(self)

    def serving(self, name: str | None) -> InferenceService:
        """The version of ``name`` (None: the default model) that new requests get."""
        name = self.default if name is None else name
        service = self.models.get(name)
        if service is not None:
            return service
        if not name.strip():
            raise InvalidInput("model: empty; leave it out to ask the default model (GET /v1/models lists them)")
        if name in self._loading or (self.starting and name == self.default):
            raise NotReady(f"model {name!r} is loading; retry shortly (GET /readyz answers 200 once it is ready)")
        served = ", ".join(sorted(self.models)) or "none"
        how = (
            f"POST /v2/repository/models/{quote(name, safe='')}/load (with the admin key) loads a model of the store"
            if self.settings.model_control == "explicit"
            else "GET /v1/models lists them"
        )
        raise NotFound(f"unknown model {name!r}: not served here (served: {served}); {how}")

    @property
    def starting(self) -> bool:
        """The models asked for at start are still loading (and the default one has not failed)."""
        return not self.started and self.state.load_error is None

    @property
    def serving_any(self) -> bool:
        """A request would find some model to serve it."""
        return bool(self.models)

    @property
    def not_serving(self) -> str | None:
        """Why no request is served (every inference request is refused 503 for it); None while they are."""
        if self.starting:
            return "the model is still loading; retry shortly (GET /readyz answers 200 once it is ready)"
        if self.models:
            return None
        if self.state.load_error is not None:
            return f"no model could be loaded: {self.state.load_error}"
        return "no model is served; POST /v2/repository/models/{name}/load loads one of the store"

    # -- changing what is served -----------------------------------------------------------------
    async def load(self, name: str, version: str | None = None, *, announce: bool = True) -> LoadResult:
        """Serve ``version`` of ``name`` (the highest in the store when None), swapping out the version served
        now, if any. Raises NotFound (no such model or version in the store) or LoadRefused (it does not
        verify or warm up; what was served keeps serving)."""
        self._check_known(name)
        ticket = self.take_ticket() if announce else 0  # when asked: before waiting for the lock or the load
        async with self._lock(name):
            try:
                path = resolve(self.settings.store, name, version)
            except ModelNotFoundError as error:
                raise NotFound(str(error)) from None
            except StoreError as error:
                raise LoadRefused(f"model {name!r}: {error}") from None
            current = self.models.get(name)
            if current is not None and current.model.version == path.name:
                self._reasons.pop(name, None)
                return LoadResult(name, path.name, path.name, 0.0)
            started = time.perf_counter()
            self._loading.add(name)
            try:
                service = await asyncio.to_thread(self._build, name, path.name)
            except Exception as error:  # noqa: BLE001 - any failure refuses this version; the old one serves on
                keeps = f"version {current.model.version} keeps serving" if current else "it is not served"
                reason = f"version {path.name} refused: {type(error).__name__}: {error}"
                self._reasons[name] = reason
                logger.error("model %s: %s; %s", name, reason, keeps)
                raise LoadRefused(f"model {name!r}: {reason}; {keeps}") from None
            finally:
                self._loading.discard(name)
            service.batcher.start()
            self.models[name] = service  # the swap: from here on, new requests lease the new version
            backend = service.pipeline.backend  # model_info shows a version once it serves, never a refused one
            service.metrics.set_model_info(service.model.version, backend.name, backend.device)
            self._reasons.pop(name, None)
            self._follow_default()
            if current is not None:
                self._retire(current)
            seconds = time.perf_counter() - started
            previous = current.model.version if current else None
            logger.info("model %s: serving version %s (was %s), ready in %.2f s", name, path.name, previous, seconds)
        if announce and self.on_change is not None and self.on_change(name, path.name, ticket) is False:
            raise Superseded(
                f"model {name!r}: version {path.name} was loaded, but a load or unload asked after this one (on "
                "another worker) has already taken effect and wins: every worker follows that one"
            )
        return LoadResult(name, path.name, previous, seconds)

    async def unload(self, name: str, *, announce: bool = True) -> str | None:
        """Stop serving ``name`` once the requests using it have finished; the version it served, or None when
        it was not served (not an error, as in Triton). NotFound when the store has no such model either."""
        self._check_known(name)
        ticket = self.take_ticket() if announce else 0
        async with self._lock(name):
            service = self.models.pop(name, None)
            if service is None:
                if announce and self.on_change is not None:
                    self.on_change(name, None, ticket)  # this later unload still wins over an earlier load elsewhere
                return None
            self._reasons[name] = "unloaded"
            self._follow_default()
            retiring = self._retire(service)
        superseded = announce and self.on_change is not None and self.on_change(name, None, ticket) is False
        await retiring
        if superseded:
            raise Superseded(
                f"model {name!r} was unloaded, but a load asked after this unload (on another worker) has already "
                "taken effect and wins: every worker follows that one"
            )
        logger.info("model %s: version %s unloaded", name, service.model.version)
        return service.model.version

    async def stop(self) -> None:
        """At shutdown: every served version answers what it accepted, then stops."""
        services, self.models = list(self.models.values()), {}
        self._follow_default()
        await asyncio.gather(*(service.stop() for service in services), *self._retiring)

    # -- what the store holds --------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every model of the store (and every served one), with its state."""
        stored = list_store(self.settings.store)
        entries = []
        for name in sorted(set(stored) | set(self.models)):
            service = self.models.get(name)
            if service is not None:
                entry = {"name": name, "version": service.model.version, "state": READY}
                entry["reason"] = self._reasons.get(name, "")
            else:
                versions = stored.get(name, [""])
                state = LOADING if name in self._loading else UNAVAILABLE
                entry = {"name": name, "version": versions[-1], "state": state}
                entry["reason"] = self._reasons.get(name, "" if state == LOADING else "not loaded")
            entry["versions"] = stored.get(name, [])
            if not ready_only or entry["state"] == READY:
                entries.append(entry)
        return entries

    def versions(self) -> dict[str, str]:
        """Model -> the version new requests get."""
        return {name: service.model.version for name, service in self.models.items()}

    # -- internals -------------------------------------------------------------------------------
    def _build(self, name: str, version: str) -> InferenceService:
        """Verify, build and warm one version (blocking: runs in a thread)."""
        settings = self.settings.model_copy(update={"model": name, "model_version": version})
        # The Ray engine builds pipelines whose experts are deployments of their own (service/ray/).
        make_pipeline = getattr(self.state, "make_pipeline", None)
        extra = {} if make_pipeline is None else {"make_pipeline": make_pipeline}
        service = InferenceService.load(settings, self.metrics.for_model(name), **extra)
        if (service.model.name, service.model.version) != (name, version):
            raise ValueError(
                f"its model.json names {service.model.name} version {service.model.version}, but it is stored as "
                f"{name}/{version}: a request for one would be answered by the other"
            )
        return service

    def _check_known(self, name: str) -> None:
        """NotFound for a name neither served nor in the store, before any lock or entry is made for it (names
        that clients make up would otherwise each leave one behind)."""
        if name in self.models or name in self._locks:
            return
        if name not in list_store(self.settings.store):
            raise NotFound(f"no model {name!r} is served here or held in the store")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _follow_default(self) -> None:
        self.state.service = self.models.get(self.default)

    def _retire(self, service: InferenceService) -> asyncio.Task:
        """Stop ``service`` once its leases are returned (its requests done), in the background."""
        backend = service.pipeline.backend
        service.metrics.clear_model_info(service.model.version, backend.name, backend.device)
        task = asyncio.get_running_loop().create_task(self._drain_and_stop(service), name="dynfuse-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain_and_stop(self, service: InferenceService) -> None:
        if self._leases.get(service, 0):
            drained = self._drained.setdefault(service, asyncio.Event())
            # Every request has a deadline, so the leases end by then; past it, stop() answers the rest.
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(drained.wait(), self.settings.request_timeout_s + 1.0)
        await service.stop()
        self._leases.pop(service, None)
        self._drained.pop(service, None)

    def _take(self, service: InferenceService) -> None:
        self._leases[service] = self._leases.get(service, 0) + 1

    def _give_back(self, service: InferenceService) -> None:
        left = self._leases.get(service, 1) - 1
        self._leases[service] = left
        if left <= 0:
            self._leases.pop(service, None)
            drained = self._drained.get(service)
            if drained is not None:
                drained.set()


class Leases:
    """The model versions one request uses, held until it ends (the route dependency returns them)."""

    def __init__(self, repository: ModelRepository):
        self._repository = repository
        self._held: list[InferenceService] = []

    def get(self, name: str | None = None) -> InferenceService:
        """The version of ``name`` (None: the default model) to use for this whole request."""
        wanted = self._repository.default if name is None else name
        for service in self._held:
            if service.model.name == wanted:
                return service
        service = self._repository.serving(name)
        self._repository._take(service)
        self._held.append(service)
        return service

    def release(self) -> None:
        for service in self._held:
            self._repository._give_back(service)
        self._held.clear()
