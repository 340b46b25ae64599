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
