"""``dynfuse serve``: uvicorn around ``create_app``, with a graceful SIGTERM (stop accepting, finish
in-flight requests, exit 0)."""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from export.store import StoreError, resolve
from service.config import Settings
from service.main import create_app

GRACEFUL_SHUTDOWN_S = 30


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail fast on the common mistake, before binding a port
        path = resolve(settings.store, settings.model, settings.model_version)
    except StoreError as error:
        print(f"dynfuse serve: error: {error}", file=sys.stderr)
        return 1
    base = f"http://{settings.host}:{settings.port}"
    runtime = f"{settings.backend}, {settings.device}"
    print(f"dynfuse: serving {path.parent.name} v{path.name} from {settings.store} ({runtime})")
    print(f"dynfuse: API docs at {base}/docs, readiness at {base}/readyz, metrics at {base}/metrics", flush=True)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
    )
    # uvicorn shuts down gracefully on SIGTERM, then restores the previous handler and re-raises the
    # signal. A handler that does nothing makes that a clean exit 0: the stop was requested, not a crash.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    return 0
