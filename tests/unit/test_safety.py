"""models/safety.py: validation agreement, the policy table and the guard's choice, on outputs built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import RoutingOutputs
from models.safety import CONFIDENCE_FLOORS, choose_guard, measure, policy_name

EXPERTS = ["cheap", "mid", "full"]


def probs(labels, top):
    """(N, 3) class probabilities answering ``labels`` with top probability ``top`` (the rest split evenly)."""
    out = np.zeros((len(labels), 3))
    for i, (label, p) in enumerate(zip(labels, top, strict=True)):
        out[i] = (1 - p) / 2
        out[i, label] = p
    return out


def outputs() -> RoutingOutputs:
    """8 samples, all of class 0. The full path is always right. The router "r" sends samples 0-3 to cheap,
    4-5 to mid, 6-7 to full. cheap answers right (0) on 0, 1 (sure: 0.9) and wrong on 2, 3 (unsure: 0.45);
    mid answers right on 4 (0.8) and wrong on 5 (0.6)."""
    labels = np.zeros(8, int)
    cheap = probs([0, 0, 1, 2, 0, 0, 0, 0], [0.9, 0.9, 0.45, 0.45, 0.9, 0.9, 0.9, 0.9])
    mid = probs([0, 0, 0, 0, 0, 1, 0, 0], [0.9, 0.9, 0.9, 0.9, 0.8, 0.6, 0.9, 0.9])
    full = probs([0] * 8, [0.9] * 8)
    choice = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    scores = np.full((8, 3), 0.1)
    scores[np.arange(8), choice] = 0.8
    return RoutingOutputs(
        labels=labels,
        expert_probs={"cheap": cheap, "mid": mid, "full": full},
        router_scores={"r": scores},
        routers=[{"name": "r", "lambda": 0.5}],
        default_router="r",
        experts=EXPERTS,
        path_madds={"cheap": 10, "mid": 50, "full": 100},
        static_madds={"cheap": 9, "mid": 49, "full": 99},
        madds_full=100,
        full_expert="full",
        shared_madds=5,
        component_madds={"c": 5, "m": 45, "f": 95},
        expert_components={"cheap": ("c",), "mid": ("m",), "full": ("f",)},
    )


def test_agreement_of_the_cheaper_answers_with_the_full_path():
    point = measure(outputs())["operating_points"]["r"]
    # 6 cheaper answers (0-5), 3 agree with full (0, 1, 4)
    assert point["agreement"] == pytest.approx(3 / 6)
    assert point["cheaper_share"] == pytest.approx(6 / 8)
    assert point["by_expert"] == {
        "cheap": {"agreement": pytest.approx(2 / 4), "answers": 4},
        "mid": {"agreement": pytest.approx(1 / 2), "answers": 2},
    }


def test_the_policy_table_with_confidence_floors():
    rows = {row["policy"]: row for row in measure(outputs())["policies"]}
    assert set(rows) == {policy_name("r", None)} | {policy_name("r", f) for f in CONFIDENCE_FLOORS}
    alone = rows["r"]
    assert alone["accuracy"] == pytest.approx(5 / 8)
    assert alone["agreement"] == pytest.approx(5 / 8)
    # madds: 4 x 10 + 2 x 50 + 2 x 100 = 340, over 8 = 42.5
    assert alone["saved_ratio"] == pytest.approx(1 - 42.5 / 100)
    # floor 0.5: the two unsure cheap answers (0.45) fall back to full; each costs shared 5 + c 5 + f 95 = 105
    half = rows["r+min_confidence=0.5"]
    assert half["fallback_share"] == pytest.approx(2 / 8)
    assert half["accuracy"] == pytest.approx(7 / 8)
    assert half["saved_ratio"] == pytest.approx(1 - (2 * 10 + 2 * 105 + 2 * 50 + 2 * 100) / 8 / 100)
    # floor 0.7: mid's 0.6 answer falls back too (5 + 45 + 95 = 145): everything agrees with full
    seven = rows["r+min_confidence=0.7"]
    assert seven["agreement"] == pytest.approx(1.0)
    assert seven["saved_ratio"] == pytest.approx(1 - (2 * 10 + 2 * 105 + 50 + 145 + 2 * 100) / 8 / 100)


def test_the_guard_takes_the_lowest_floor_that_halves_the_disagreement():
    safety = measure(outputs())
    # Alone: disagreement 3/8. Floor 0.5: 1/8 <= 3/16 -> the lowest qualifying floor (0.3 and 0.4 catch nothing).
    assert safety["guard"]["r"]["min_confidence"] == 0.5
    assert safety["guard"]["r"]["policy"] == "r+min_confidence=0.5"
    assert safety["guard"]["r"]["validation"]["agreement"] == pytest.approx(7 / 8)


def test_no_safer_policy_when_the_point_already_agrees_everywhere():
    rows = [
        {"policy": "p", "operating_point": "p", "min_confidence": None, "accuracy": 0.9, "agreement": 1.0},
        {"policy": "p+min_confidence=0.5", "operating_point": "p", "min_confidence": 0.5, "accuracy": 0.9,
         "agreement": 1.0, "saved_ratio": 0.1},
    ]  # fmt: skip
    assert choose_guard(rows, "p")["min_confidence"] is None


def test_expert_temperatures_cool_an_overconfident_expert():
    """An expert that says 0.99 and is right half the time is calibrated by a temperature above 1."""
    rng = np.random.default_rng(0)
    labels = rng.integers(3, size=400)
    answers = np.where(rng.random(400) < 0.5, labels, (labels + 1) % 3)
    base = outputs()
    overconfident = probs(answers, [0.99] * 400)
    routed = RoutingOutputs(
        **{**base.__dict__, "labels": labels, "router_scores": {"r": np.tile([0.8, 0.1, 0.1], (400, 1))},
           "expert_probs": {"cheap": overconfident, "mid": overconfident, "full": probs(labels, [0.9] * 400)}}
    )  # fmt: skip
    temperatures = measure(routed)["expert_temperatures"]
    assert temperatures["cheap"] > 2.0
    assert temperatures["full"] < 1.0  # always right at 0.9: sharpened


def test_agreement_counts_the_cheaper_answers_that_match_the_full_paths():
    """cheap now answers right on samples 0-2 and wrong on 3 only: 3 of its 4 answers agree with full, mid 1 of 2."""
    base = outputs()
    cheap = probs([0, 0, 0, 2, 0, 0, 0, 0], [0.9, 0.9, 0.45, 0.45, 0.9, 0.9, 0.9, 0.9])
    routed = RoutingOutputs(**{**base.__dict__, "expert_probs": {**base.expert_probs, "cheap": cheap}})
    point = measure(routed)["operating_points"]["r"]
    assert point["agreement"] == pytest.approx(4 / 6)
    assert point["by_expert"]["cheap"] == {"agreement": pytest.approx(3 / 4), "answers": 4}
    assert point["by_expert"]["mid"] == {"agreement": pytest.approx(1 / 2), "answers": 2}


def test_the_floor_a_point_is_served_with_is_measured_and_the_guard_stands_above_it():
    """The default router served with a floor of 0.55 (model.json router.min_confidence, not one of
    CONFIDENCE_FLOORS): its policy is measured, and the guard's floor must be safer than it. At 0.55 the two unsure
    cheap answers (0.45) fall back, as at 0.5 (agreement 7/8); 0.6 changes nothing (mid's 0.6 is not below it); 0.7
    also sends mid's 0.6 to full: agreement 8/8, the lowest floor that halves 0.55's disagreement. Served without a
    floor, the guard would take 0.5 (test_the_guard_takes_the_lowest_floor_that_halves_the_disagreement)."""
    assert 0.55 not in CONFIDENCE_FLOORS
    served = RoutingOutputs(**{**outputs().__dict__, "default_min_confidence": 0.55})
    safety = measure(served)
    rows = {row["policy"]: row for row in safety["policies"]}
    assert set(rows) == {"r", "r+min_confidence=0.55"} | {policy_name("r", f) for f in CONFIDENCE_FLOORS}
    assert rows["r+min_confidence=0.55"]["min_confidence"] == 0.55
    assert rows["r+min_confidence=0.55"]["agreement"] == pytest.approx(7 / 8)
    assert rows["r+min_confidence=0.55"]["fallback_share"] == pytest.approx(2 / 8)
    guard = safety["guard"]["r"]
    assert (guard["min_confidence"], guard["policy"]) == (0.7, "r+min_confidence=0.7")
    assert guard["served_validation"]["agreement"] == pytest.approx(7 / 8)  # the 0.55 policy, not the point alone


def policy(floor, accuracy, agreement) -> dict:
    return {"policy": policy_name("p", floor), "operating_point": "p", "min_confidence": floor,
            "accuracy": accuracy, "agreement": agreement, "saved_ratio": 0.5, "fallback_share": 0.1}  # fmt: skip


def test_a_floor_at_exactly_half_the_disagreement_qualifies():
    """Alone: disagreement 0.25, so the target is 0.125 (every figure exact in binary). 0.5 reaches it exactly and is
    the lowest floor that does; 0.6 goes further but is a higher floor."""
    rows = [policy(None, 0.8, 0.75), policy(0.5, 0.8, 0.875), policy(0.6, 0.8, 0.9)]
    assert choose_guard(rows, "p")["min_confidence"] == 0.5


def test_of_floors_short_of_halving_and_equally_safe_the_guard_takes_the_lowest():
    """Alone: disagreement 0.4 (target 0.2). 0.5 and 0.7 both bring it to 0.3, short of the target: the lower floor,
    which sends fewer answers to the full path for the same agreement."""
    rows = [policy(None, 0.8, 0.6), policy(0.5, 0.8, 0.7), policy(0.7, 0.8, 0.7)]
    assert choose_guard(rows, "p")["min_confidence"] == 0.5
