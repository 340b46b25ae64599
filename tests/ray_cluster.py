"""Ray for the tests, as a user gets it: a local cluster of this machine's CPUs (Ray's own count: 2 on the
development machines), the application sized to it by its defaults, started on loopback, bounded in time, and
torn down with nothing left behind (no dashboard, no auth token under the home directory, a private temp dir).
Also: a model version whose answers differ from version 1's in a known way, and the processes a cluster left."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# Replicas start one Python each and load the model on a 2-core machine shared with other work: the ingress,
# then the seven experts it deploys, took 50-90 s there with a build running beside.
START_TIMEOUT_S = 300


@contextlib.contextmanager
def ray_application(args: dict, port: int, metrics_port: int | None = None, env: dict | None = None) -> Iterator[str]:
    """The application of ``service.ray.app:build(args)`` on a fresh local cluster; yields its base URL once
    /readyz is 200. ``env``: DYNFUSE_* variables the replicas read (they inherit this process's environment)."""
    import ray
    from ray import serve

    from service.ray.app import APP_NAME, build
    from service.ray.run import start_serve

    extra = {"RAY_AUTH_MODE": "disabled", **(env or {})}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    # Short: Ray's socket paths live under it and a Unix socket path may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    options = {"_metrics_export_port": metrics_port} if metrics_port else {}
    try:
        ray.init(
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            **options,
        )
        start_serve({"host": "127.0.0.1", "port": port}, START_TIMEOUT_S)  # past Ray's own 60 s for the proxy
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


def publish_biased_version(store: Path, version: str, expert: str, label: str, source: str = "shapes/1") -> Path:
    """A new version of the model that answers ``label`` whenever ``expert`` runs: a copy of ``source`` whose
    expert's last component adds 30 to that label's logit (an ONNX Add after its output), with the hashes in
    model.json updated. So an answer's label says which version's expert computed it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    target = store / "shapes" / version
    shutil.copytree(store / source, target)
    manifest = json.loads((target / "model.json").read_text())
    [chain] = [e["components"] for e in manifest["experts"] if e["name"] == expert]
    component = manifest["components"][chain[-1]]
    path = target / component["files"]["onnx"]["file"]
    graph_model = onnx.load(path)
    graph = graph_model.graph
    [output] = [o for o in graph.output if o.name == "logits"]
    for node in graph.node:
        node.output[:] = ["logits_before_bias" if name == "logits" else name for name in node.output]
    bias = np.zeros(len(manifest["labels"]), np.float32)
    bias[manifest["labels"].index(label)] = 30.0
    graph.initializer.append(numpy_helper.from_array(bias, "label_bias"))
    graph.node.append(helper.make_node("Add", ["logits_before_bias", "label_bias"], [output.name]))
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    component["files"]["onnx"]["sha256"] = digest
    if path.name in manifest.get("files", {}):
        manifest["files"][path.name]["sha256"] = digest
    manifest.update(version=version)
    (target / "model.json").write_text(json.dumps(manifest))
    return target


RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard", "log_monitor", "runtime_env")


def processes_marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds ``mark`` (a value only the processes
    one test started carry: Ray's processes inherit the environment of the command that started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        if state != "Z":
            found.append((int(entry.name), command))
    return found


def replica_pids(deployment_app: str, timeout: float = 30.0) -> list[int]:
    """The processes of a Serve application's replicas, by the title Ray gives an actor's worker process
    (``ray::ServeReplica:<app>:<deployment>``); waits for at least one (a replica Serve is replacing, after a
    health check a busy machine made it miss, has no process for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"ServeReplica:{deployment_app}:" in command:
                pids.append(int(entry.name))
        if pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)
