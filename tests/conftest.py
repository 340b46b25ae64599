"""Shared fixtures: one tiny synthetic data set, one tiny trained run and one exported store per session.

The tiny preset trains in seconds on 2 cores; everything that needs a real model uses these.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

MODEL_NAME = "shapes"

# Servers and other test processes share the cores with the suite's own training. torch's OpenMP threads
# spin-wait for each other, and beside another busy process they stall: a training step that takes 0.4 s
# on one thread took 3 s on two. One thread trains the tiny preset in seconds whatever else runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def require_tool(name: str) -> str:
    """A tool a test needs, next to this Python (the venv's bin/, where pip puts hadolint) or on PATH:
    a failure under CI (``.ci/run`` and ``make test`` install every one), a skip elsewhere."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed")
    return path


def quiet(*_args, **_kwargs) -> None:
    """A ``log`` that prints nothing."""
    return


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of the client's /metrics as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    """One sample of ``scrape``'s result; 0 when the series does not exist."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from models.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, SynthConfig(size=960, seed=0, image_size=32), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    from models.training import TrainConfig, train

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train(tiny_data, run, TrainConfig(preset="tiny", lambdas=(0.0, 0.3)), progress=False, log=quiet)
    return run


@pytest.fixture(scope="session")
def tiny_store(tiny_run, tmp_path_factory) -> Path:
    """A store with one version of the tiny model; treat it as read-only (copy it to change it)."""
    from export.writer import export_run

    store = tmp_path_factory.mktemp("tiny-store") / "store"
    export_run(tiny_run, store, name=MODEL_NAME, progress=False, log=quiet)
    return store


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A private copy of the tiny store, free to tamper with."""
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


@pytest.fixture
def manifest(tiny_store) -> dict:
    """The tiny store's model.json."""
    return json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())


@pytest.fixture(scope="session")
def samples(tiny_data) -> list[dict]:
    """Test-split samples of the tiny data set: id, png bytes, text, label, kind."""
    import json

    out = []
    for line in (tiny_data / "test.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out.append({**entry, "png": (tiny_data / entry["img"]).read_bytes()})
    return out


def wait_ready(client, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


@pytest.fixture
def serve(tiny_store):
    """``serve(**settings)`` -> a TestClient on a started, ready app over the tiny store."""
    from contextlib import ExitStack

    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    stack = ExitStack()

    def start(**overrides):
        settings = Settings(store=overrides.pop("store", tiny_store), **overrides)
        client = stack.enter_context(TestClient(create_app(settings), raise_server_exceptions=False))
        wait_ready(client)
        return client

    yield start
    stack.close()


@pytest.fixture
def held_model_load(monkeypatch) -> threading.Event:
    """Hold ``InferenceService.load`` until the returned event is set: the app is up, its model not yet."""
    from service import inference

    release = threading.Event()
    real_load = inference.InferenceService.load

    def held_load(settings, metrics):
        release.wait(timeout=60)
        return real_load(settings, metrics)

    monkeypatch.setattr(inference.InferenceService, "load", staticmethod(held_load))
    return release


def worker_pids(parent: int) -> list[int]:
    """The uvicorn worker processes (spawned children) of a ``dynfuse serve --workers N``."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in cmdline:
            workers.append(int(entry.name))
    return workers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(store: Path, started: list, **env) -> tuple:
    """A real ``dynfuse serve`` on a free loopback port, ready: (process, base_url). The process is appended
    to ``started``, whose owner kills what is still running (``stop_servers``)."""
    import subprocess
    import time

    import httpx

    port = free_port()
    # One worker process unless a test asks for more: dynfuse serve's default, one per core, is tested as such
    # (tests/e2e/test_server.py); the other tests look at one process.
    settings = {"workers": 1, **env}
    variables = {**os.environ, "PYTHONUNBUFFERED": "1", **{f"DYNFUSE_{k.upper()}": str(v) for k, v in settings.items()}}
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(store), "--port", str(port)]
    process = subprocess.Popen(command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started.append(process)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dynfuse serve exited {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("dynfuse serve did not become ready in 60 s")


def stop_servers(started: list) -> None:
    """SIGTERM first: a server of several workers stops them with it (SIGKILL to its supervisor alone would leave
    them running, holding the port); SIGKILL only if it does not stop in time."""
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def server_process(tiny_store):
    """``start(**env)`` -> (process, base_url): a real ``dynfuse serve`` on a free loopback port, ready.
    Every process is killed at teardown if the test has not stopped it."""
    started = []
    yield lambda store=None, **env: launch_server(store or tiny_store, started, **env)
    stop_servers(started)
