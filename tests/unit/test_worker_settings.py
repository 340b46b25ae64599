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
