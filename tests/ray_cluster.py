"""A local Ray cluster with the dynfuse application, for the tests: started on loopback, bounded in time, and
torn down with nothing left behind (no dashboard, no auth token under the home directory, a private temp dir)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import httpx

START_TIMEOUT_S = 120  # replicas load the model on a 2-core machine shared with other work


@contextlib.contextmanager
def ray_application(args: dict, port: int, num_cpus: int = 8, metrics_port: int | None = None) -> Iterator[str]:
    """The application of ``service.ray.app:build(args)`` on a fresh local cluster; yields its base URL once
    /readyz is 200."""
    import ray
    from ray import serve

    from service.ray.app import APP_NAME, build

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Short: Ray's socket paths live under it and a Unix socket path may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    options = {"_metrics_export_port": metrics_port} if metrics_port else {}
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            **options,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        serve.run(build(args), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        yield base
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_ready(base: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = httpx.get(f"{base}/readyz", timeout=5)
            if last.status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"the Ray application is not ready after {timeout} s: {last and last.text}")
