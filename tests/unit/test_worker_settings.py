"""``dynfuse serve --workers N`` hands its settings to each worker process through the environment."""

from __future__ import annotations

import os

from service.config import Settings
from service.server import _environment


def test_settings_survive_the_trip_to_a_worker_through_the_environment(monkeypatch, tmp_path):
    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    settings = Settings(
        store=tmp_path,
        model="shapes",
        port=8123,
        workers=3,
        threads=2,
        max_batch_delay_ms=0.5,
        api_key="secret",
        log_level="warning",
    )
    for name, value in _environment(settings).items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_unset_options_stay_unset_in_the_worker(monkeypatch, tmp_path):
    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    environment = _environment(Settings(store=tmp_path))
    assert "DYNFUSE_API_KEY" not in environment
    assert "DYNFUSE_MODEL" not in environment


def test_workers_are_pinned_to_the_version_resolved_at_start(monkeypatch, tmp_path):
    """A worker that uvicorn restarts reads its settings again: it must not pick up a newer version."""
    from service.server import pinned

    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    settings = pinned(Settings(store=tmp_path, workers=2), tmp_path / "shapes" / "3")
    environment = _environment(settings)
    assert environment["DYNFUSE_MODEL"] == "shapes"
    assert environment["DYNFUSE_MODEL_VERSION"] == "3"


def test_the_live_gauges_of_a_dead_worker_are_forgotten(tmp_path):
    import subprocess
    import sys

    from service.metrics import forget_dead_processes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getpid()
    for pid in (dead.pid, alive):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    assert forget_dead_processes(str(tmp_path)) == [dead.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead.pid}.db", f"counter_{alive}.db", f"gauge_livesum_{alive}.db"]
    )


def test_serve_flags_become_settings(monkeypatch, tmp_path):
    from service import cli, server

    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    seen = {}
    monkeypatch.setattr(server, "serve", lambda settings: seen.setdefault("settings", settings) and 0)
    argv = ["serve", "--store", str(tmp_path), "--workers", "2", "--threads", "1", "--max-inflight", "64"]
    argv += ["--request-timeout", "2.5", "--log-level", "warning"]
    cli.main(argv)
    settings = seen["settings"]
    assert (settings.workers, settings.threads, settings.max_inflight) == (2, 1, 64)
    assert settings.capacity == 64
    assert (settings.request_timeout_s, settings.log_level) == (2.5, "warning")


def test_model_info_never_shows_a_dead_workers_version(tmp_path):
    """With --workers N, a worker that died (killed, crashed) leaves its metric files behind; its model_info
    series (a version the others may no longer serve) must not be reported as served."""
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dead = "from service.metrics import Metrics; Metrics('m').set_model_info('1', 'onnx', 'cpu')"
    subprocess.run([sys.executable, "-c", dead], env=env, check=True, timeout=60)  # exits without saying so
    alive = (
        "from service.metrics import Metrics; m = Metrics('m'); m.set_model_info('2', 'onnx', 'cpu'); "
        "print(m.render().decode())"
    )
    run = {"env": env, "check": True, "timeout": 60, "capture_output": True, "text": True}
    text = subprocess.run([sys.executable, "-c", alive], **run)
    lines = [line for line in text.stdout.splitlines() if line.startswith("dynfuse_model_info{")]
    assert lines == ['dynfuse_model_info{backend="onnx",device="cpu",model="m",version="2"} 1.0']


def write_cgroup(root, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return root


def test_available_cores_is_the_affinity_within_the_cgroup_quota(monkeypatch, tmp_path):
    from service import server

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cases = {
        "no cgroup files": (None, None, 8),
        "v2 without a limit": ("max 100000", None, 8),
        "v2, 2 CPUs": ("200000 100000", None, 2),
        "v2, 1.5 CPUs: two cores, each partly": ("150000 100000", None, 2),
        "v2, a quota above the affinity": ("1600000 100000", None, 8),
        "v2, a tenth of a CPU": ("10000 100000", None, 1),
        "v1 without a limit": (None, ("-1", "100000"), 8),
        "v1, 3 CPUs": (None, ("300000", "100000"), 3),
    }
    for name, (v2, v1, expected) in cases.items():
        root = tmp_path / name.replace(" ", "_").replace(",", "").replace(":", "")
        root.mkdir()
        assert server.available_cores(write_cgroup(root, v2, v1)) == expected, name


def test_serve_starts_one_worker_per_core_unless_told_otherwise(monkeypatch, tmp_path):
    """Workers 0 (the default) is one per core; a number given is kept; one core, or a GPU, serves in this
    process."""
    from service import server

    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "shapes" / "1").mkdir(parents=True)
    (tmp_path / "shapes" / "1" / "model.json").write_text("{}")
    started = {}
    monkeypatch.setattr(server, "_serve_workers", lambda settings: started.setdefault("workers", settings) and 0)
    monkeypatch.setattr(server.uvicorn.Server, "run", lambda self: started.setdefault("one process", True))
    monkeypatch.setattr(server, "tune_for_serving", lambda: None)  # not this test process's GC
    monkeypatch.setattr(server.signal, "signal", lambda *args: None)  # nor its SIGTERM handler
    monkeypatch.setattr(server, "available_cores", lambda: 3)
    assert Settings(store=tmp_path).workers == 0
    server.serve(Settings(store=tmp_path))
    assert started.pop("workers").workers == 3
    server.serve(Settings(store=tmp_path, workers=2))
    assert started.pop("workers").workers == 2
    monkeypatch.setattr(server, "available_cores", lambda: 1)
    server.serve(Settings(store=tmp_path))
    assert started.pop("one process")
    monkeypatch.setattr(server, "available_cores", lambda: 3)
    server.serve(Settings(store=tmp_path, device="cuda"))  # one process holds the model on the GPU
    assert started == {"one process": True}
