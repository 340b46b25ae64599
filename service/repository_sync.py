"""Keeping what is served current: the models to load at start, the store poll, and (``--workers N``) every
worker following the loads and unloads that one of them was asked for.

Workers share no memory, so a load request reaches one of them. That worker loads the version (verified and
warmed, as anywhere), then writes the wanted ``{model: version}`` to one small JSON file that every worker
reads twice a second (``follow``); a worker whose served versions differ loads and unloads until they match.
The file is also what a worker reads at start, so one that uvicorn restarts serves what its siblings serve.
``dynfuse serve --workers N`` creates it (``STATE_FILE_ENV``) before it starts the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from export.store import StoreError, list_store, resolve
from service.config import Settings
from service.errors import ApiError

if TYPE_CHECKING:  # not imported at run time: the supervisor of N workers uses this module without a runtime
    from service.repository import ModelRepository

logger = logging.getLogger("dynfuse")

STATE_FILE_ENV = "DYNFUSE_REPOSITORY_STATE_FILE"  # set by `dynfuse serve --workers N` for its workers
FOLLOW_INTERVAL_S = 0.5
SUPERVISED_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # before the 1st, 2nd, ... restart in a row
SUPERVISED_HEALTHY_S = 60.0  # a run that lasted this long was healthy: the next failure starts the backoff over


def startup_models(settings: Settings, default: str) -> dict[str, str | None]:
    """Model -> version (None: the highest) to serve from the start: the default model (at its pinned
    version, if any) first, then those DYNFUSE_MODELS names."""
    wanted: dict[str, str | None] = {default: settings.model_version}
    if settings.models:
        names = list(list_store(settings.store)) if settings.models.strip() == "*" else settings.models.split(",")
        for name in (n.strip() for n in names):
            if name and name not in wanted:
                wanted[name] = None
    return wanted


class SharedState:
    """What every worker serves, in one JSON file, changed under a lock and replaced atomically, so that a reader
    sees the whole of one version of it:

        {"seq": 7, "models": {"shapes": {"version": "2", "seq": 6}, "old": {"version": null, "seq": 7}}}

    ``seq`` orders the control calls: each one takes a ticket (``ticket``) when it is asked, and its outcome is
    written only over an entry of an older ticket (``update``), so that when two calls race, on one worker or
    two, the one asked last wins everywhere, whichever finished last. An unloaded model stays as an entry of
    version null, so that a late answer to an older load cannot bring it back."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict | None:
        """The whole state, or None when the file is missing or unreadable (then: ``rebuild``)."""
        try:
            state = json.loads(self.path.read_text())
            models = state["models"]
            if not isinstance(state["seq"], int) or not all(
                isinstance(entry["seq"], int) and (entry["version"] is None or isinstance(entry["version"], str))
                for entry in models.values()
            ):
                raise ValueError("wrong types")
            return state
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def wanted(self) -> dict[str, str] | None:
        """Model -> version to serve (unloaded ones left out), or None when the file is missing or unreadable."""
        state = self.read()
        if state is None:
            return None
        return {name: entry["version"] for name, entry in state["models"].items() if entry["version"] is not None}

    def write(self, served: dict[str, str]) -> None:
        """Start afresh: these models at these versions."""
        with self._locked():
            self._replace({"seq": 0, "models": {name: {"version": v, "seq": 0} for name, v in served.items()}})

    def rebuild(self, served: dict[str, str]) -> bool:
        """A missing or unreadable file is written again from what ``served`` says (what a worker serves now),
        never read as "serve nothing"; False when another worker did it first."""
        with self._locked():
            if self.read() is not None:
                return False
            self._replace({"seq": 0, "models": {name: {"version": v, "seq": 0} for name, v in served.items()}})
            return True

    def ticket(self) -> int:
        """The next sequence number: taken when a control call is asked, before it waits for anything."""
        with self._locked():
            state = self.read() or {"seq": 0, "models": {}}
            state["seq"] += 1
            self._replace(state)
            return state["seq"]

    def update(self, name: str, version: str | None, ticket: int) -> bool:
        """``name`` is now served at ``version`` (None: unloaded), as asked by the call of ``ticket``; False (and
        nothing written) when a call asked later has already set it."""
        with self._locked():
            state = self.read() or {"seq": ticket, "models": {}}
            entry = state["models"].get(name)
            if entry is not None and entry["seq"] > ticket:
                return False
            state["models"][name] = {"version": version, "seq": ticket}
            state["seq"] = max(state["seq"], ticket)
            self._replace(state)
            return True

    def _replace(self, state: dict) -> None:
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(state, sort_keys=True))
        os.replace(partial, self.path)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


async def follow(repository: ModelRepository, shared: SharedState, interval_s: float = FOLLOW_INTERVAL_S) -> None:
    """Load and unload until this worker serves what the shared file asks for, whatever it served before (a load
    that another worker's later call superseded included). A change that fails here (it loaded in the worker
    that was asked, so rarely) is logged and tried again at the file's next change. A missing or unreadable file
    is written again from what this worker serves."""
    wanted_before: dict[str, str] | None = None
    failed: set[tuple[str, str]] = set()  # (model, version) that failed to load for the file as it is
    while True:
        await asyncio.sleep(interval_s)
        wanted = shared.wanted()
        if wanted is None:
            if shared.rebuild(repository.versions()):
                logger.warning("the workers' state file %s was missing or unreadable: rebuilt from what this "
                               "worker serves", shared.path)  # fmt: skip
            continue
        if wanted != wanted_before:
            wanted_before, failed = wanted, set()
        served = repository.versions()
        for name, version in wanted.items():
            if served.get(name) != version and (name, version) not in failed:
                with _logged(f"following the other workers: load {name} v{version}", failed, (name, version)):
                    await repository.load(name, version, announce=False)
        for name in set(served) - set(wanted):
            with _logged(f"following the other workers: unload {name}", failed, (name, "")):
                await repository.unload(name, announce=False)


async def supervised(name: str, run: Callable[[], Awaitable[None]], on_restart: Callable[[], None]) -> None:
    """Run the loop ``run()`` for good: when it fails (or ends), log it, call ``on_restart`` (a metric) and start
    it again after a backoff that grows with failures in a row, and starts over once a run lasted a while."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await run()
            error = None
        except asyncio.CancelledError:
            raise
        except Exception as caught:  # noqa: BLE001 - the loop must outlive any error of one run
            error = caught
        if time.monotonic() - started > SUPERVISED_HEALTHY_S:
            failures = 0
        delay = SUPERVISED_BACKOFF_S[min(failures, len(SUPERVISED_BACKOFF_S) - 1)]
        failures += 1
        on_restart()
        logger.error("%s %s; starting it again in %.1f s", name, "failed" if error else "ended", delay, exc_info=error)
        await asyncio.sleep(delay)


async def poll_store(repository: ModelRepository, interval_s: float) -> None:
    """Every ``interval_s``, swap each served model to the highest version in the store (Triton's POLL mode,
    for versions of the models served). A version that was refused is not tried again until its model.json
    changes. The default model stays put while DYNFUSE_MODEL_VERSION pins it."""
    settings = repository.settings
    refused: dict[str, tuple[str, int]] = {}  # model -> (version, model.json mtime) refused
    while True:
        await asyncio.sleep(interval_s)
        for name, served in repository.versions().items():
            if name == repository.default and settings.model_version is not None:
                continue
            try:
                newest = resolve(settings.store, name)
                stamp = (newest.name, newest.joinpath("model.json").stat().st_mtime_ns)
            except (StoreError, OSError):
                continue  # the model left the store, or a version is being written: next time
            if newest.name == served or refused.get(name) == stamp:
                continue
            try:
                await repository.load(name, newest.name)
            except ApiError as error:
                refused[name] = stamp
                logger.error("store poll: %s", error.message)


@contextlib.contextmanager
def _logged(what: str, failed: set | None = None, attempt: tuple | None = None):
    try:
        yield
    except ApiError as error:
        logger.error("%s failed: %s", what, error.message)
        if failed is not None:
            failed.add(attempt)
