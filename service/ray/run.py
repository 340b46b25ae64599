"""``dynfuse serve --engine ray``: the application on a Ray cluster, in the foreground.

Without ``--address`` a local cluster is started for the process (no dashboard: it costs about 940 MiB and ten
processes) and shut down with it. With ``--address auto`` or ``ray://host:10001`` the application is deployed
on that cluster and deleted again when the command stops; the cluster stays. SIGTERM or Ctrl-C stop it:
Serve drains the requests in flight (each replica's graceful shutdown) before the command exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from service.config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve_on_ray(settings: Settings, address: str | None) -> int:
    import ray
    from ray import serve

    from export.store import StoreError
    from service.ray.app import APP_NAME, build
    from service.ray.options import AppArgs

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    overrides = settings.model_dump(mode="json", exclude_unset=True, exclude={"host", "port", "workers"})
    args = AppArgs(settings=overrides)
    try:
        application = build(args)
    except StoreError as error:
        print(f"dynfuse serve: error: {error}", file=sys.stderr)
        return 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written under the home directory
    local = address is None
    ray.init(address=address, include_dashboard=False if local else None, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": settings.host, "port": settings.port},
            logging_config={"enable_access_log": False},
        )
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        base = f"http://{settings.host}:{settings.port}"
        where = "a local Ray cluster" if local else f"the Ray cluster at {address}"
        print(f"dynfuse: serving on {where}; readiness at {base}/readyz, metrics at {base}/metrics", flush=True)
        stop.wait()
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
