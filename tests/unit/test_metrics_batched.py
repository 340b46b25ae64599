"""A batch's answers observed at once leave /metrics as observing them one by one does: every bucket count and counter
the same, every sum the same up to the order of its additions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.drift import RouteMixDrift
from service.metrics import Metrics, observe_all

EXPERTS = ("text", "image", "mi2p")


def samples(metrics: Metrics) -> dict:
    """(name, sorted labels) -> value of every sample /metrics shows."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def assert_same(batched: dict, one_by_one: dict) -> None:
    assert batched.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        if key[0].endswith("_sum"):  # float additions in another order
            assert batched[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert batched[key] == value, key


def answers(count: int, seed: int) -> list[SimpleNamespace]:
    rng = np.random.default_rng(seed)
    edges = [0.0, 0.1, 0.3, 0.95, 1.0, 1.5]  # on a bucket's bound, past the last finite one
    made = []
    for i in range(count):
        text_share = edges[i % len(edges)] if i % 3 == 0 else float(rng.random())
        made.append(
            SimpleNamespace(
                expert=EXPERTS[int(rng.integers(len(EXPERTS)))],
                decided_by=("router", "confidence")[i % 2],
                madds=int(rng.integers(1, 10**7)),
                importance=np.array([text_share, 1 - text_share], np.float32),
                modality_weights=None if i % 5 == 0 else np.array([0.25, 0.75], np.float32),
                operating_point=("lambda_0.6", None)[i % 4 == 3],
                degraded=i % 7 == 0,
                top=float(rng.random()) if i % 6 else 1.0,
                reason=(None, "low_confidence", "out_of_distribution")[i % 3],
            )
        )
    return made


def test_a_batch_of_answers_leaves_the_metrics_one_by_one_observation_leaves():
    batch = answers(64, seed=1)
    one_by_one, batched = Metrics("m"), Metrics("m")
    for a in batch:
        one_by_one.observe_prediction(
            expert=a.expert, decided_by=a.decided_by, madds=a.madds, madds_full=9_000_000, importance=a.importance,
            modality_weights=a.modality_weights, operating_point=a.operating_point, degraded=a.degraded,
        )  # fmt: skip
        one_by_one.observe_answer(a.expert, a.top, a.reason)
    batched.observe_predictions(batch, 9_000_000)
    batched.observe_answers([a.expert for a in batch], [a.top for a in batch], [a.reason for a in batch])
    assert_same(samples(batched), samples(one_by_one))


@pytest.mark.parametrize("values", [[], [0.1], [0.0, 0.1, 0.1000001, 0.5, 1.0, 1.0000001, 7.0], [-1.0, math.nan, 0.2]])
def test_observe_all_puts_each_value_in_the_bucket_observe_does(values):
    one_by_one, batched = Metrics("m"), Metrics("m")
    for value in values:
        one_by_one.modality_weight.labels("m", "text").observe(value)
    observe_all(batched.modality_weight.labels("m", "text"), values)
    expected, got = samples(one_by_one), samples(batched)
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


def test_drift_of_a_batch_is_drift_after_its_picks_one_by_one():
    mixes = {"p": {"text": 0.5, "image": 0.3, "mi2p": 0.2}}
    published_one, published_batch = [], []
    one = RouteMixDrift(EXPERTS, mixes, window=50, publish=lambda point, value: published_one.append(value))
    batch = RouteMixDrift(EXPERTS, mixes, window=50, publish=lambda point, value: published_batch.append(value))
    picks = np.random.default_rng(3).integers(0, 3, 230).tolist()
    for start in range(0, len(picks), 16):  # batches of 16, the last one short; the window turns over
        chunk = picks[start : start + 16]
        for pick in chunk:
            one.observe("p", pick)
        batch.observe_all("p", chunk)
        assert batch.values == one.values
        assert batch.mix("p") == one.mix("p")
    assert published_batch[-1] == published_one[-1]
    batch.observe_all("p", [])  # nothing new: nothing published again
    # Once per batch that left the window with at least its 50 picks: not once per pick.
    assert len(published_batch) == sum(min(start + 16, len(picks)) >= 50 for start in range(0, len(picks), 16))
