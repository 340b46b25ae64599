"""``dynfuse serve``: uvicorn around ``create_app``, with a graceful SIGTERM (stop accepting, finish
in-flight requests, exit 0).

A process runs its requests' Python (HTTP parsing, decoding, the pipeline's glue) under one GIL, so by default
``dynfuse serve`` starts one worker process per core it may use (``--workers N`` sets another number; one core,
or ``--workers 1``, serves in this process), all on the same port, each with its own model, micro-batcher and a
share of the cores for the runtime; prometheus_client's multiprocess mode sums their metrics. A worker gets its
settings through the ``DYNFUSE_*`` environment.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.supervisors import Multiprocess

from export.store import StoreError, load_model_dir, resolve
from service.config import Settings, check_settings_for, get_settings
from service.decode import missing_codecs
from service.gc_policy import tune_for_serving
from service.http_protocol import HTTP_PROTOCOL
from service.listeners import ReservedPort, WorkerListener
from service.metrics import MULTIPROCESS_DIR
from service.repository_sync import STATE_FILE_ENV, SharedState, startup_models

if TYPE_CHECKING:
    from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 30
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:  # fail fast on the common mistakes, before binding a port
        path = resolve(settings.store, settings.model, settings.model_version)
        if settings.operating_point is not None or settings.degrade_to is not None:  # names a part of the model
            check_settings_for(load_model_dir(path, verify=False), settings)
    except StoreError as error:
        print(f"dynfuse serve: error: {error}", file=sys.stderr)
        return 1
    if missing := missing_codecs():
        print(
            f"dynfuse serve: error: this Pillow cannot decode {', '.join(missing)}, which the API accepts; install a "
            "Pillow built with it (PyPI's wheels are: pip install --force-reinstall pillow)",
            file=sys.stderr,
        )
        return 1
    settings = pinned(settings, path)
    if settings.grpc_port:
        problem = port_in_use(settings.host, settings.grpc_port)
        if problem is not None:
            print(f"dynfuse serve: error: cannot serve gRPC on port {settings.grpc_port} (--grpc-port, "
                  f"DYNFUSE_GRPC_PORT): {problem}", file=sys.stderr)  # fmt: skip
            return 1
    if not settings.workers:  # one per core; on a GPU one process (N would hold N copies of the model there)
        settings = settings.model_copy(update={"workers": 1 if settings.device == "cuda" else available_cores()})
    if settings.grpc_port == 0 and settings.workers > 1:
        message = (
            f"DYNFUSE_GRPC_PORT=0 (any free port) would give each of the {settings.workers} worker processes a "
            "different port: name the port, or serve one process (--workers 1)"
        )
        print(f"dynfuse serve: error: {message}", file=sys.stderr)
        return 1
    base = f"http://{settings.host}:{settings.port}"
    runtime = f"{settings.backend}, {settings.device}"
    print(f"dynfuse: serving {path.parent.name} v{path.name} from {settings.store} ({runtime})")
    print(f"dynfuse: API docs at {base}/docs, readiness at {base}/readyz, metrics at {base}/metrics", flush=True)
    if settings.grpc_port is not None:
        print(f"dynfuse: Open Inference Protocol over gRPC on {settings.host}:{settings.grpc_port or '(a free port)'}")
    if settings.workers > 1:
        return _serve_workers(settings)
    from service.main import create_app  # here, not at the top: the supervisor of N workers never needs it

    app = create_app(settings)
    tune_for_serving()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        http=HTTP_PROTOCOL,
    )
    # uvicorn shuts down gracefully on SIGTERM, then restores the previous handler and re-raises the
    # signal. A handler that does nothing makes that a clean exit 0: the stop was requested, not a crash.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


def port_in_use(host: str, port: int) -> str | None:
    """Why ``port`` can't be bound on ``host`` (in use, not allowed), or None. The socket sets no SO_REUSEPORT, so
    a server that holds the port with it (as gRPC's workers do) counts as in use too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, within its cgroup's CPU quota (a container limited to 2
    CPUs on a 64-core host sees 64 in its affinity)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs the cgroup may use (quota / period), or None without a limit: cgroup v2's cpu.max, else v1's files."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def pinned(settings: Settings, path) -> Settings:
    """The settings with the model and version resolved once, here: a worker that uvicorn restarts later
    then loads the version its siblings serve, not a newer one exported meanwhile."""
    return settings.model_copy(update={"model": path.parent.name, "model_version": path.name})


def _serve_workers(settings: Settings) -> int:
    """N uvicorn worker processes on one port; uvicorn's supervisor restarts a worker that dies (the
    metrics drop a dead worker's in-flight gauge at the next scrape), and on SIGTERM stops them all
    gracefully. Each worker listens on a socket of its own with SO_REUSEPORT (service/listeners.py), so the port is
    checked first: that option would otherwise let the workers share it with another server already on it."""
    problem = port_in_use(settings.host, settings.port) if settings.port else None
    reserved = None
    try:
        reserved = ReservedPort(settings.host, settings.port) if problem is None else None
    except OSError as error:  # taken meanwhile, or a host this machine does not have
        problem = error.strerror or str(error)
    if reserved is None:
        print(f"dynfuse serve: error: cannot serve on port {settings.port}: {problem}", file=sys.stderr)
        return 1
    threads = settings.threads or max(1, available_cores() // settings.workers)  # N runtimes on all cores would thrash
    where = f"http://{settings.host}:{reserved.port}"  # port 0 resolved here, once for every worker
    print(f"dynfuse: {settings.workers} worker processes on {where}, {threads} runtime thread(s) each", flush=True)
    worker_settings = settings.model_copy(update={"threads": threads})
    # A fresh directory per run: files left by an earlier run would be summed into this one's metrics.
    with (
        reserved,
        tempfile.TemporaryDirectory(prefix="dynfuse-metrics-") as metrics_dir,
        tempfile.TemporaryDirectory(prefix="dynfuse-repository-") as repository_dir,
    ):
        os.environ.update(_environment(worker_settings))
        os.environ[MULTIPROCESS_DIR] = metrics_dir
        # What every worker serves, changed by the repository API in any worker (service/repository_sync.py).
        shared = SharedState(Path(repository_dir) / "served.json")
        shared.write(_served_at_start(settings))
        os.environ[STATE_FILE_ENV] = str(shared.path)
        config = uvicorn.Config(
            "service.server:worker_app",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            access_log=False,
            http=HTTP_PROTOCOL,
        )
        # Each worker listens on a socket of its own (service/listeners.py): one shared socket lets one worker take
        # every connection of a client that opens a few at once.
        _supervisor(config, reserved.listener()).run()
    return 0


def _supervisor(config: uvicorn.Config, listener: WorkerListener) -> Multiprocess:
    """uvicorn's supervisor of ``config.workers`` processes, each started (and restarted) with ``listener``. Recent
    uvicorn releases take the sockets alone; older ones (0.35 and before) also the function each worker runs."""
    if "target" in inspect.signature(Multiprocess).parameters:
        return Multiprocess(config, target=uvicorn.Server(config).run, sockets=[listener])  # type: ignore[call-arg]
    return Multiprocess(config, sockets=[listener])  # type: ignore[list-item]


def _served_at_start(settings: Settings) -> dict[str, str]:
    """Model -> the version every worker loads at start (resolved here, once, as ``pinned`` does)."""
    served = {}
    for name, version in startup_models(settings, settings.model).items():
        try:
            served[name] = resolve(settings.store, name, version).name
        except StoreError as error:
            print(f"dynfuse serve: not serving {name}: {error}", file=sys.stderr)
    return served


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn imports it there), configured from the environment."""
    from service.main import create_app

    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    app = create_app(settings)
    tune_for_serving()
    return app


def _environment(settings: Settings) -> dict[str, str]:
    """The settings as the ``DYNFUSE_*`` variables that rebuild them in a worker process."""
    values = settings.model_dump(exclude_none=True)
    return {f"DYNFUSE_{name.upper()}": str(value) for name, value in values.items()}
