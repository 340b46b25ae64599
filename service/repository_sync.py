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
    """The ``{model: version}`` every worker serves, in one JSON file, changed under a lock and replaced
    atomically, so that a reader sees the whole of one version of it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def write(self, wanted: dict[str, str]) -> None:
        with self._locked():
            self._replace(wanted)

    def update(self, name: str, version: str | None) -> None:
        """``name`` is now served at ``version`` (None: unloaded)."""
        with self._locked():
            wanted = self.read()
            if version is None:
                wanted.pop(name, None)
            else:
                wanted[name] = version
            self._replace(wanted)

    def _replace(self, wanted: dict[str, str]) -> None:
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(wanted, sort_keys=True))
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
    """Load and unload until this worker serves what the shared file asks for. A change that fails here
    (it loaded in the worker that was asked, so rarely) is logged and tried again at the file's next change."""
    tried: dict[str, str] = repository.versions()
    while True:
        await asyncio.sleep(interval_s)
        wanted = shared.read()
        if wanted == tried:
            continue
        tried = wanted
        served = repository.versions()
        for name, version in wanted.items():
            if served.get(name) != version:
                with _logged(f"following the other workers: load {name} v{version}"):
                    await repository.load(name, version, announce=False)
        for name in set(served) - set(wanted):
            with _logged(f"following the other workers: unload {name}"):
                await repository.unload(name, announce=False)


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
def _logged(what: str):
    try:
        yield
    except ApiError as error:
        logger.error("%s failed: %s", what, error.message)
