"""service/metrics.py's quick .labels(): the very series prometheus_client's own .labels() gives, in every case."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from service.metrics import Counter, Histogram


def test_quick_labels_find_the_librarys_own_series():
    registry = CollectorRegistry()
    counter = Counter("t_requests", "help", ["model", "status"], registry=registry)
    made = counter.labels("m", "200")
    assert counter.labels("m", "200") is made
    assert counter.labels("m", 200) is made  # a value of another type: the library's str()
    assert counter.labels(model="m", status="200") is made
    counter.labels("m", "200").inc(3)
    assert registry.get_sample_value("t_requests_total", {"model": "m", "status": "200"}) == 3.0
    # remove() and clear() change the dict the quick path reads: a new series after them, never the old one
    counter.remove("m", "200")
    fresh = counter.labels("m", "200")
    assert fresh is not made
    assert fresh._value.get() == 0.0
    counter.clear()
    assert counter.labels("m", "200") is not fresh


def test_quick_labels_refuse_what_the_library_refuses():
    histogram = Histogram("t_seconds", "help", ["model"], buckets=(1.0,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="Incorrect label count"):
        histogram.labels("m", "extra")
    with pytest.raises(ValueError, match="Incorrect label names"):
        histogram.labels(other="m")
    plain = prometheus_client.Histogram("t2_seconds", "help", ["model"], buckets=(1.0,), registry=CollectorRegistry())
    histogram.labels("m").observe(0.5)
    plain.labels("m").observe(0.5)

    def values(metric):
        return [
            (s.name.split("_", 1)[1], s.labels, s.value)
            for s in metric.collect()[0].samples
            if "_created" not in s.name
        ]

    assert values(histogram) == values(plain)
