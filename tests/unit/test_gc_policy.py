"""A serving process collects garbage rarely and never scans what lives as long as it does."""

from __future__ import annotations

import gc

import pytest

from service.config import get_settings
from service.gc_policy import GEN0_THRESHOLD
from service.server import worker_app


@pytest.fixture
def restored_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_a_worker_freezes_its_app_and_collects_only_past_the_raised_threshold(restored_gc, monkeypatch, tmp_path):
    monkeypatch.setenv("DYNFUSE_STORE", str(tmp_path))
    monkeypatch.setenv("DYNFUSE_MODEL", "shapes")
    assert gc.get_threshold()[0] < GEN0_THRESHOLD  # CPython's default: 700
    get_settings.cache_clear()
    app = worker_app()
    get_settings.cache_clear()
    assert app.state.settings.model == "shapes"
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    assert gc.get_freeze_count() > 0
    # What the requests in flight allocate and free again no longer triggers a collection.
    collections = gc.get_stats()[0]["collections"]
    in_flight = [{"scope": {}, "headers": [], "body": [i]} for i in range(GEN0_THRESHOLD // 8)]  # ~5,000 objects
    assert gc.get_stats()[0]["collections"] == collections
    del in_flight
