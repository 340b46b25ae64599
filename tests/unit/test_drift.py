"""service/drift.py: the Jensen-Shannon divergence and the sliding window of router picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.drift import MIN_REQUESTS, RouteMixDrift, jensen_shannon


def entropy_bits(p) -> float:
    return -sum(x * math.log2(x) for x in p if x > 0)


def js_by_entropy(p, q) -> float:
    """JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2: another formula than the code's (two KL terms)."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ((0.5, 0.5), (1.0, 0.0)),
        ((0.2, 0.3, 0.5), (0.5, 0.3, 0.2)),
        ((0.1, 0.0, 0.9, 0.0), (0.25, 0.25, 0.25, 0.25)),
    ],
)
def test_jensen_shannon_matches_the_entropy_formula(p, q):
    assert jensen_shannon(p, q) == pytest.approx(js_by_entropy(p, q), abs=1e-12)


def test_jensen_shannon_bounds():
    assert jensen_shannon((1, 0), (0, 1)) == pytest.approx(1.0)  # nothing in common: one bit
    assert jensen_shannon((3, 1), (0.75, 0.25)) == pytest.approx(0.0)  # counts are normalized first
    assert jensen_shannon((0.5, 0.5), (1.0, 0.0)) == pytest.approx(0.311278, abs=1e-6)


def test_the_window_slides_and_publishes_once_it_holds_enough_picks():
    published = []
    drift = RouteMixDrift(("a", "b"), {"p": {"a": 0.5, "b": 0.5}}, window=10, publish=lambda *v: published.append(v))
    for _ in range(9):
        drift.observe("p", 0)
    assert published == []  # 9 < min(window, MIN_REQUESTS)
    drift.observe("p", 0)
    assert published[-1] == ("p", pytest.approx(js_by_entropy((1, 0), (0.5, 0.5))))
    for _ in range(5):
        drift.observe("p", 1)  # the window now holds 5 of each: the validation mix
    assert published[-1][1] == pytest.approx(0.0, abs=1e-12)
    assert drift.mix("p") == {"a": 0.5, "b": 0.5}


def test_a_point_without_a_validation_mix_is_not_tracked():
    published = []
    drift = RouteMixDrift(("a", "b"), {"p": {}}, window=5, publish=lambda *v: published.append(v))
    for _ in range(10):
        drift.observe("p", 0)
        drift.observe("q", 1)
    assert published == []
    assert drift.describe() == {}


def test_a_long_window_publishes_after_min_requests():
    published = []
    drift = RouteMixDrift(
        ("a", "b"), {"p": {"a": 1.0}}, window=10 * MIN_REQUESTS, publish=lambda *v: published.append(v)
    )
    rng = np.random.default_rng(0)
    for _ in range(MIN_REQUESTS - 1):
        drift.observe("p", int(rng.integers(2)))
    assert published == []
    drift.observe("p", 0)
    assert len(published) == 1


def test_a_calls_picks_move_the_window_as_one_by_one_and_publish_once():
    rng = np.random.default_rng(1)
    picks = [int(p) for p in rng.integers(3, size=37)]
    mixes = {"p": {"a": 0.6, "b": 0.3, "c": 0.1}}
    one_by_one, together = [], []
    single = RouteMixDrift(("a", "b", "c"), mixes, window=10, publish=lambda *v: one_by_one.append(v))
    batched = RouteMixDrift(("a", "b", "c"), mixes, window=10, publish=lambda *v: together.append(v))
    for start in range(0, len(picks), 8):  # calls of 8 picks, a short one last
        call = picks[start : start + 8]
        for pick in call:
            single.observe("p", pick)
        published = len(together)
        batched.observe_all("p", call)
        assert len(together) == published + (1 if start + len(call) >= 10 else 0)  # once per call, when due
        assert together[-1:] == one_by_one[-1:]  # the window the call leaves, the same value
    assert batched.describe() == single.describe()
    batched.observe_all("p", [])  # an empty call changes nothing
    assert len(together) == 4  # the last four calls: the first one left fewer picks than the window needs
