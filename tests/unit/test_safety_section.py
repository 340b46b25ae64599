"""models/safety.py's ``safety`` section as model.json carries it, on the hand-built outputs of
tests/unit/test_safety.py: its fields by name, a full path in any column, a router that never answers cheaper,
the guard's choice exactly at its lines, and the calibrated confidence the server reports, worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from test_safety import outputs, probs

from models.evaluation import RoutingOutputs
from models.policy import fit_temperature
from models.safety import GUARD_RULE, calibrated_confidence, choose_guard, measure


def test_the_section_names_its_split_samples_and_rule_and_rounds_temperatures_to_four_places():
    safety = measure(outputs())

    assert set(safety) == {
        "split", "samples", "expert_temperatures", "operating_points", "policies", "guard", "guard_rule",
    }  # fmt: skip
    assert (safety["split"], safety["samples"], safety["guard_rule"]) == ("val", 8, GUARD_RULE)
    base = outputs()
    searched = {e: fit_temperature(base.expert_probs[e], base.labels) for e in base.experts}  # models/policy.py
    assert all(t != round(t, 5) for t in searched.values())  # more places than four to cut
    assert safety["expert_temperatures"] == {e: round(t, 4) for e, t in searched.items()}


def test_the_guards_entry_names_its_fields():
    guard = measure(outputs())["guard"]["r"]

    assert set(guard) == {"operating_point", "min_confidence", "policy", "validation", "served_validation"}
    assert guard["operating_point"] == "r"
    assert guard["served_validation"] == {
        "accuracy": pytest.approx(5 / 8), "agreement": pytest.approx(5 / 8), "saved_ratio": pytest.approx(0.575),
    }  # fmt: skip
    assert set(guard["validation"]) == {"accuracy", "agreement", "saved_ratio", "fallback_share"}


def reordered(order: list[str]) -> RoutingOutputs:
    """The same outputs with the experts' columns in ``order`` (the router's scores permuted alike)."""
    base = outputs()
    columns = [base.experts.index(e) for e in order]
    return RoutingOutputs(
        **{**base.__dict__, "experts": order, "router_scores": {"r": base.router_scores["r"][:, columns]}}
    )


def test_the_figures_do_not_depend_on_the_full_paths_column():
    reference = measure(outputs())
    for order in (["full", "cheap", "mid"], ["cheap", "full", "mid"]):
        moved = measure(reordered(order))
        assert moved["operating_points"] == reference["operating_points"], order
        assert moved["guard"] == reference["guard"], order


def test_a_router_that_never_picks_a_cheaper_expert_agrees_fully_and_lists_no_expert():
    base = outputs()
    always_full = np.tile([0.1, 0.1, 0.8], (8, 1))
    point = measure(RoutingOutputs(**{**base.__dict__, "router_scores": {"r": always_full}}))["operating_points"]["r"]

    assert point == {"agreement": 1.0, "cheaper_share": 0.0, "by_expert": {}}


def test_only_the_experts_a_router_picks_are_listed():
    base = outputs()
    no_mid = base.router_scores["r"].copy()
    no_mid[4:6] = [0.8, 0.1, 0.1]  # samples 4-5 go to cheap instead of mid
    point = measure(RoutingOutputs(**{**base.__dict__, "router_scores": {"r": no_mid}}))["operating_points"]["r"]

    assert set(point["by_expert"]) == {"cheap"}


def rows(base_agreement: float, base_accuracy: float, floor_agreement: float, floor_accuracy: float) -> list[dict]:
    return [
        {"policy": "p", "operating_point": "p", "min_confidence": None, "accuracy": base_accuracy,
         "agreement": base_agreement, "saved_ratio": 0.5},
        {"policy": "p+min_confidence=0.5", "operating_point": "p", "min_confidence": 0.5, "accuracy": floor_accuracy,
         "agreement": floor_agreement, "saved_ratio": 0.25, "fallback_share": 0.25},
    ]  # fmt: skip


def test_a_floor_exactly_at_half_the_disagreement_and_exactly_as_accurate_qualifies():
    # Alone: disagreement 0.5; the floor: 0.25, exactly half (binary-exact figures), and the same accuracy.
    chosen = choose_guard(rows(0.5, 0.75, 0.75, 0.75), "p")

    assert chosen["min_confidence"] == 0.5
    assert chosen["policy"] == "p+min_confidence=0.5"
    assert chosen["validation"] == {"accuracy": 0.75, "agreement": 0.75, "saved_ratio": 0.25, "fallback_share": 0.25}
    assert chosen["served_validation"] == {"accuracy": 0.75, "agreement": 0.5, "saved_ratio": 0.5}


def test_no_floor_qualifies_below_the_served_points_accuracy_and_the_answer_says_so_by_name():
    assert choose_guard(rows(0.5, 0.75, 0.75, 0.5), "p") == {
        "operating_point": "p", "min_confidence": None, "policy": None,
    }  # fmt: skip


def test_a_floor_short_of_halving_still_guards_and_the_one_that_disagrees_least_is_chosen():
    # Alone: disagreement 0.5. Floors 0.5 and 0.75 lower it to 0.375 and 0.3125, neither down to 0.25: the guard
    # takes 0.75, the one that disagrees least, rather than no guard at all.
    policies = rows(0.5, 0.75, 0.625, 0.75) + [
        {"policy": "p+min_confidence=0.75", "operating_point": "p", "min_confidence": 0.75, "accuracy": 0.75,
         "agreement": 0.6875, "saved_ratio": 0.125, "fallback_share": 0.5},
    ]  # fmt: skip

    chosen = choose_guard(policies, "p")

    assert chosen["policy"] == "p+min_confidence=0.75"
    assert chosen["validation"]["agreement"] == 0.6875


def test_a_floor_that_agrees_no_more_than_the_point_alone_is_no_guard():
    assert choose_guard(rows(0.5, 0.75, 0.5, 0.75), "p")["policy"] is None


def test_calibrated_confidence_is_the_top_probability_at_the_temperature():
    probabilities = probs([0, 2], [0.8, 0.5])  # rows (0.8, 0.1, 0.1) and (0.25, 0.25, 0.5)

    at_two = calibrated_confidence(probabilities, 2.0)
    at_one = calibrated_confidence(probabilities, 1.0)

    roots = np.sqrt(probabilities)  # softmax(log p / 2) = sqrt(p) normalized
    assert at_two == pytest.approx(roots.max(axis=1) / roots.sum(axis=1), abs=1e-12)
    assert at_one == pytest.approx([0.8, 0.5], abs=1e-12)
    assert at_two.dtype == np.float64
    assert calibrated_confidence(probabilities.astype(np.float32), 2.0).dtype == np.float64  # computed in float64
