"""service/ray/metrics.py without a cluster: what RayMetrics hands Ray's metric objects (stood in for by a recorder),
so that Ray's export has what the process's own registry has (the cluster test, tests/integration/test_ray_engine.py,
sees the result through Ray's agent)."""

from __future__ import annotations

import time

import pytest

from service.ray.metrics import RayMetrics


class RecordedRemote:
    """What a Ray metric was given: ("set" | "record" | "inc", value, tags)."""

    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append(("set", value, dict(tags)))

    def inc(self, value, tags):
        self.calls.append(("inc", value, dict(tags)))

    def _record(self, value, tags):
        self.calls.append(("record", value, dict(tags)))


@pytest.fixture
def metrics():
    metrics = RayMetrics("m", resend_every_s=3600)  # the resender stays asleep; tests call resend() themselves
    yield metrics
    metrics.close()


def recording(kind):
    kind.remote = RecordedRemote()
    return kind.remote.calls


def test_a_counter_series_is_created_at_zero_once_then_counts(metrics):
    calls = recording(metrics.degraded_requests)
    for _ in range(3):
        metrics.degraded_requests.labels("other")
    metrics.degraded_requests.labels("other").inc(2)
    assert calls == [("record", 0.0, {"model": "other"}), ("inc", 2, {"model": "other"})]


def test_the_service_creates_its_counters_at_zero_for_ray_too():
    calls = {}
    original = RayMetrics.kinds[0].announce

    def spy(self, tags):
        calls.setdefault(self.local._name, []).append(tags)
        original(self, tags)

    RayMetrics.kinds[0].announce = spy
    try:
        metrics = RayMetrics("m", resend_every_s=3600)
        metrics.init_routes(["text", "full"], ("router",), operating_points=("cheap",), soft="soft")
        metrics.close()
    finally:
        RayMetrics.kinds[0].announce = original
    assert {"dynfuse_degraded_requests", "dynfuse_degraded_seconds", "dynfuse_compute_madds"} <= set(calls)
    assert {"model": "m", "status": "200", "protocol": "http", "key": "anonymous"} in calls["dynfuse_requests"]
    assert {"model": "m", "operating_point": "cheap"} in calls["dynfuse_operating_point_requests"]


def test_every_gauge_is_sent_again_with_its_last_value(metrics):
    assert {g.local._name for g in metrics.gauges} == {
        "dynfuse_inflight_requests",
        "dynfuse_model_info",
        "dynfuse_validated_agreement",
        "dynfuse_route_mix_drift",
        "dynfuse_guard_active",
    }
    metrics.set_model_info("1", "onnx", "cpu")
    inflight = metrics.inflight.labels("m")
    inflight.inc()
    inflight.inc()
    inflight.dec()
    info_calls, inflight_calls = recording(metrics.model_info), recording(metrics.inflight)
    for gauge in metrics.gauges:
        gauge.resend()
    assert info_calls == [("set", 1, {"model": "m", "version": "1", "backend": "onnx", "device": "cpu"})]
    assert inflight_calls == [("set", 1.0, {"model": "m"})]


def test_a_removed_series_is_no_longer_sent(metrics):
    metrics.set_model_info("1", "onnx", "cpu")
    metrics.set_model_info("2", "onnx", "cpu")
    metrics.clear_model_info("1", "onnx", "cpu")  # the repository, swapping version 1 out
    calls = recording(metrics.model_info)
    metrics.model_info.resend()
    assert calls == [("set", 1, {"model": "m", "version": "2", "backend": "onnx", "device": "cpu"})]
    assert 'version="1"' not in metrics.render().decode()


def test_the_resender_runs_until_closed():
    metrics = RayMetrics("m", resend_every_s=0.05)
    calls = recording(metrics.inflight)
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics.close()
    assert calls[:2] == [("set", 0.0, {"model": "m"})] * 2
    metrics._resender.join(timeout=5)
    assert not metrics._resender.is_alive()
