"""A call's answers observed at once (``Metrics.observe_call``) leave /metrics as observing them one by one does:
every bucket count and counter the same, every sum the same up to the order of its additions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics, observe_all

EXPERTS = ("text", "image", "mi2p")
MADDS_FULL = 9_000_000


def samples(metrics: Metrics) -> dict:
    """(name, sorted labels) -> value of every sample /metrics shows."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def assert_same(per_call: dict, one_by_one: dict) -> None:
    assert per_call.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        if key[0].endswith("_sum"):  # float additions in another order
            assert per_call[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert per_call[key] == value, key


def outputs(count: int, seed: int) -> list[SimpleNamespace]:
    """What the metrics read of PipelineOutputs, with values on buckets' bounds and past the last finite one."""
    rng = np.random.default_rng(seed)
    edges = [0.0, 0.1, 0.3, 0.95, 1.0, 1.5]
    made = []
    for i in range(count):
        text_share = edges[i % len(edges)] if i % 3 == 0 else float(rng.random())
        top = float(rng.random()) if i % 6 else 1.0
        made.append(
            SimpleNamespace(
                expert=EXPERTS[int(rng.integers(len(EXPERTS)))],
                decided_by=("router", "confidence")[i % 2],
                madds=int(rng.integers(1, 10**7)),
                importance=np.array([text_share, 1 - text_share], np.float32),
                modality_weights=None if i % 5 == 0 else np.array([0.25, 0.75], np.float32),
                operating_point=("lambda_0.6", None)[i % 4 == 3],
                degraded=i % 7 == 0,
                probabilities=np.array([top, (1 - top) / 2, (1 - top) / 2], np.float32),
            )
        )
    return made


def test_a_calls_answers_leave_the_metrics_one_by_one_observation_leaves():
    call = outputs(64, seed=1)
    reasons = [(None, "low_confidence", "out_of_distribution")[i % 3] for i in range(len(call))]
    one_by_one, per_call = Metrics("m"), Metrics("m")
    for out, reason in zip(call, reasons, strict=True):
        one_by_one.observe_prediction(
            expert=out.expert, decided_by=out.decided_by, madds=out.madds, madds_full=MADDS_FULL,
            importance=out.importance, modality_weights=out.modality_weights, operating_point=out.operating_point,
            degraded=out.degraded,
        )  # fmt: skip
        one_by_one.observe_answer(out.expert, float(out.probabilities.max()), reason)
    per_call.observe_call(call, reasons, MADDS_FULL)
    assert_same(samples(per_call), samples(one_by_one))


@pytest.mark.parametrize("values", [[], [0.1], [0.0, 0.1, 0.1000001, 0.5, 1.0, 1.0000001, 7.0], [-1.0, math.nan, 0.2]])
def test_observe_all_puts_each_value_in_the_bucket_observe_does(values):
    one_by_one, per_call = Metrics("m"), Metrics("m")
    for value in values:
        one_by_one.modality_weight.labels("m", "text").observe(value)
    observe_all(per_call.modality_weight.labels("m", "text"), values)
    expected, got = samples(one_by_one), samples(per_call)
    for key in expected:
        if key[0].endswith("_sum") and math.isnan(expected[key]):
            assert math.isnan(got[key])
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    bucket = {
        dict(k[1])["le"]: v
        for k, v in got.items()
        if k[0] == "dynfuse_modality_weight_bucket" and dict(k[1])["modality"] == "text"
    }
    finite = [v for v in values if v == v]
    assert len(bucket) > 5
    for le, count in bucket.items():  # cumulative counts, worked out by hand
        assert count == sum(v <= float(le) for v in finite), le


def test_a_child_without_prometheus_buckets_is_observed_value_by_value():
    seen = []
    observe_all(SimpleNamespace(observe=seen.append), [0.3, 0.1])
    assert seen == [0.3, 0.1]
