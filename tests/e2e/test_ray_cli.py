"""``dynfuse serve --engine ray`` as a user runs it: no option but the store and the port, on this machine (2 CPUs
on the development machines; nothing here says how many). It becomes ready, answers what the single-process
server answers, and SIGTERM or SIGINT, at any stage of its start and after, ends it within 10 s with every Ray
process it started; deployments the machine cannot hold are refused within 30 s, naming what is missing.

Every Ray process inherits the command's environment, so a mark put there finds the ones this test started
(and only those: other Ray clusters may run on a shared machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import b64, free_port
from fastapi.testclient import TestClient
from ray_cluster import START_TIMEOUT_S, processes_marked

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

STOP_WITHIN_S = 10.0  # the promise (service/ray/run.py)
REFUSED_WITHIN_S = 30.0


class RayServe:
    """``dynfuse serve --engine ray`` in a subprocess, its output collected line by line."""

    def __init__(self, store, *extra: str):
        self.mark = uuid.uuid4().hex
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "service.cli", "serve", "--engine", "ray", "--store", str(store)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TEST_PROCESS_MARK": self.mark}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, timeout: float, what: str) -> float:
        """Seconds until ``condition()``; fails when the command exits first or the time is up."""
        started = time.monotonic()
        while not condition():
            assert self.process.poll() is None, f"exited {self.process.returncode} before {what}:\n{self.output}"
            assert time.monotonic() - started < timeout, f"{what} not within {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.2)
        return time.monotonic() - started

    def readyz(self) -> int | None:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def stop(self, signum: int) -> float:
        """Seconds from the signal to the command's exit (and its exit code checked)."""
        signalled = time.monotonic()
        self.process.send_signal(signum)
        self.process.wait(timeout=60)
        return time.monotonic() - signalled

    def kill(self) -> None:
        """Whatever the test left: the command and every process it started."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid, _ in processes_marked(self.mark):
            os.kill(pid, signal.SIGKILL)
        # The private temporary directory of a cluster killed that way (Ray names its session after the pid).
        for session in Path(tempfile.gettempdir()).glob(f"dynfuse-ray-*/session_*_{self.process.pid}"):
            shutil.rmtree(session.parent, ignore_errors=True)


@pytest.fixture
def ray_serve(tiny_store):
    started = []

    def start(*extra: str, store=tiny_store) -> RayServe:
        started.append(RayServe(store, *extra))
        return started[-1]

    yield start
    for command in started:
        command.kill()


def gone_within(mark: str, timeout: float) -> list:
    """The cluster's processes still running once none is left, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while (left := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def assert_stopped_cleanly(command: RayServe, seconds: float) -> None:
    assert command.process.returncode == 0, command.output[-3000:]
    assert seconds < STOP_WITHIN_S, f"stopped in {seconds:.1f} s"
    left = gone_within(command.mark, 30)  # the exit of a process killed last reaches /proc a moment after
    assert left == [], f"processes of the cluster left running: {left}"


def test_the_defaults_serve_the_single_process_answers_and_sigterm_stops_everything(ray_serve, tiny_store, samples):
    from service.config import Settings
    from service.main import create_app

    command = ray_serve()
    ready_s = command.wait_for(lambda: command.readyz() == 200, START_TIMEOUT_S, "ready")
    command.wait_for(lambda: "dynfuse: ready in" in command.output, 30, "the command saying it is ready")
    # The sizing the command chose: every deployment of the model on this machine's CPUs, in its log.
    [sizing] = [line for line in command.lines if "deployments: ingress:" in line]
    assert sizing.count("expert_") == 7, sizing
    # Serve's controller gives a starting proxy the start's whole time (DYNFUSE_RAY_PROXY_TIMEOUT_S, 300 s), not
    # Ray's 5 s, before it kills it: a busy machine's proxy took longer (service/ray/run.py, start_serve).
    [controller] = [pid for pid, line in processes_marked(command.mark) if line.startswith("ray::ServeController")]
    assert environment_of(controller).get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S") == "300"
    requests = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:24]]
    requests += [{"text": samples[30]["text"]}, {"image": b64(samples[31]["png"])}, {**requests[0], "route": "soft"}]
    with httpx.Client(base_url=command.base, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        remote = list(pool.map(lambda body: client.post("/v1/classify", json=body), requests))
    with TestClient(create_app(Settings(store=tiny_store))) as local_client:
        while local_client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        local = [local_client.post("/v1/classify", json=body) for body in requests]
    for ray_answer, local_answer in zip(remote, local, strict=True):
        assert ray_answer.status_code == local_answer.status_code == 200, ray_answer.text
        ray_body, local_body = ray_answer.json(), local_answer.json()
        for key in ("label", "model_version"):
            assert ray_body[key] == local_body[key], key
        assert ray_body["route"]["expert"] == local_body["route"]["expert"]
        for label, p in local_body["scores"].items():
            assert ray_body["scores"][label] == pytest.approx(p, abs=1e-5)
    assert_stopped_cleanly(command, command.stop(signal.SIGTERM))
    assert ready_s < START_TIMEOUT_S


@pytest.mark.parametrize(
    ("stage", "signum"),
    [
        ("ray_init", signal.SIGTERM),
        ("ray_started", signal.SIGTERM),
        ("serve_starting", signal.SIGTERM),
        ("loading", signal.SIGINT),
    ],
    ids=[
        "sigterm-while-ray-init-starts-its-processes",
        "sigterm-once-ray-started",
        "sigterm-while-serve-starts",
        "sigint-while-the-experts-deploy",
    ],
)
def test_a_signal_during_the_start_stops_everything_within_10_s(ray_serve, stage, signum):
    command = ray_serve()
    if stage == "ray_init":  # the first process of the cluster is up; ray.init goes on starting the others
        gcs_up = lambda: any("gcs_server" in line for _, line in processes_marked(command.mark))  # noqa: E731
        command.wait_for(gcs_up, 120, "Ray's GCS process")
    elif stage == "ray_started":
        command.wait_for(lambda: "Started a local Ray instance" in command.output, 120, "Ray started")
    elif stage == "serve_starting":  # sized and placed: Serve's controller and proxy are starting
        command.wait_for(lambda: "dynfuse: deployments:" in command.output, 120, "the deployments placed")
    else:
        # The ingress answers, and is still deploying the experts and warming the model through them.
        command.wait_for(lambda: command.readyz() == 503, START_TIMEOUT_S, "readyz 503 (loading)")
    assert_stopped_cleanly(command, command.stop(signum))


def test_deployments_the_machine_cannot_hold_are_refused_within_30_s_naming_what_is_missing(
    ray_serve, tmp_path
):  # fmt: skip
    # What a capacity plan for a big cluster asks for (dynfuse plan --out): a CPU for each of the ingress and
    # two mi2p replicas, on a machine of 2 CPUs (the test needs that there are fewer than 3).
    cpus = len(os.sched_getaffinity(0))
    deployments = {"ingress": {"num_cpus": cpus}, "experts": {"mi2p": {"num_replicas": 2, "num_cpus": 1}}}
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump(deployments))
    started = time.monotonic()
    command = ray_serve("--deployments", str(path))
    command.process.wait(timeout=120)
    seconds = time.monotonic() - started
    assert command.process.returncode == 1, command.output[-3000:]
    assert seconds < REFUSED_WITHIN_S, f"refused after {seconds:.1f} s"
    [error] = [line for line in command.lines if line.startswith("dynfuse serve: error:")]
    assert "does not fit on this machine's local Ray cluster" in error
    assert f"where the cluster has CPU {cpus:g} free" in error
    assert "expert_mi2p: 2 x {CPU 1}: 2 replica(s) find no room" in error, error
    assert gone_within(command.mark, 30) == []
