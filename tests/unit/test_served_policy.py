"""The served policy, a router and maybe a confidence floor: how Stage II chooses it (select_policy), what `auto`
means in the policy table with it, the guard's safer floor above it, and model.json's field for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.store import StoreError, load_model
from models.evaluation import RoutingOutputs, evaluate_policies, find_row
from models.router_selection import select_policy
from models.safety import choose_guard

ROUTERS = [{"name": "a", "lambda": 0.5}, {"name": "b", "lambda": 0.1}]
TO_CHEAP, TO_FULL = [0.9, 0.1], [0.1, 0.9]
# Every label is 0. The full path is always right; the cheap expert is sure and right on samples 0 and 1, unsure
# and wrong on 2 (top probability 0.6) and 3 (0.55).
CHEAP_PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])


def outputs(cheap_probs=CHEAP_PROBS, b_scores=(TO_CHEAP, TO_CHEAP, TO_FULL, TO_FULL)) -> RoutingOutputs:
    """Router a sends every sample to the cheap expert; router b (by default) the sure ones only. Costs: cheap path
    10, full path 100, both 110 (no shared encoders)."""
    return RoutingOutputs(
        labels=np.zeros(4, dtype=int),
        expert_probs={"cheap": np.asarray(cheap_probs, float), "full": np.tile([1.0, 0.0], (4, 1))},
        router_scores={"a": np.tile(TO_CHEAP, (4, 1)), "b": np.array(b_scores, float)},
        routers=ROUTERS,
        default_router="a",
        experts=["cheap", "full"],
        path_madds={"cheap": 10, "full": 100},
        static_madds={"cheap": 10, "full": 100},
        madds_full=100,
        full_expert="full",
        shared_madds=0,
        component_madds={"c": 10, "f": 100},
        expert_components={"cheap": ("c",), "full": ("f",)},
    )


def test_on_validation_alone_the_cheapest_router_as_accurate_as_full_is_served_without_a_floor():
    # b: right everywhere for (10 + 10 + 100 + 100) / 4 = 55 MAdds; a + a floor of 0.7 is right everywhere too but
    # pays 110 on samples 2 and 3: 60. A floor on b changes nothing (its cheap answers are sure): no floor wins.
    assert select_policy(outputs(), ROUTERS, tolerance=0.0) == ("b", None)


def test_a_floor_that_rescues_a_router_on_reworded_captions_is_chosen_at_its_lowest_level():
    # Reworded, b sends samples 2 and 3 to the cheap expert too: alone it falls to 50%. Floors of 0.3 to 0.6 leave
    # sample 2 (0.6 is not below 0.6) on the cheap answer (75%); from 0.7 both fall back and b is right again.
    reworded = outputs(b_scores=[TO_CHEAP] * 4)

    assert select_policy(outputs(), ROUTERS, tolerance=0.0, reworded=[reworded]) == ("b", 0.7)
    # A sample's worth of tolerance (25 points) admits 75%: a with floor 0.6 falls back on sample 3 alone,
    # (10 + 10 + 10 + 110) / 4 = 35 MAdds, cheaper than b's 55 (a with 0.3 to 0.5 stays at 50%).
    assert select_policy(outputs(), ROUTERS, tolerance=0.25, reworded=[reworded]) == ("a", 0.6)


def test_a_router_alone_that_holds_up_is_served_before_a_cheaper_router_with_a_floor():
    # A sample's worth of tolerance (25 points): a with floor 0.6 holds up at 75% for 35 MAdds, b alone at 100% for
    # 55. b runs one expert per request; a's floor would run two for sample 3.
    assert select_policy(outputs(), ROUTERS, tolerance=0.25) == ("b", None)


def test_when_nothing_holds_up_the_most_accurate_router_alone_on_validation_is_served():
    # Reworded, the cheap expert is sure (0.95) and wrong on sample 2, which both routers send to it: no floor helps.
    wrong_and_sure = CHEAP_PROBS.copy()
    wrong_and_sure[2] = [0.05, 0.95]
    reworded = outputs(cheap_probs=wrong_and_sure, b_scores=[TO_CHEAP] * 4)

    assert select_policy(outputs(), ROUTERS, tolerance=0.0, reworded=[reworded]) == ("b", None)


def test_auto_in_the_policy_table_is_the_served_router_with_its_floor():
    table = outputs()
    alone = find_row(evaluate_policies(table, thresholds=(), confidences=()), "auto")
    table.default_min_confidence = 0.58  # a falls back on sample 3 (0.55) only
    floored = find_row(evaluate_policies(table, thresholds=(), confidences=()), "auto")

    assert (alone["accuracy"], alone["madds_per_sample"]) == (0.5, 10.0)
    assert floored["accuracy"] == 0.75
    assert floored["madds_per_sample"] == pytest.approx((10 + 10 + 10 + 110) / 4)
    assert (floored["min_confidence"], floored["fallback_share"]) == (0.58, 0.25)
    assert floored["route_mix"] == {"cheap": 0.75, "full": 0.25}


def guard_rows() -> list[dict]:
    def row(floor, agreement, accuracy):
        name = "p" if floor is None else f"p+min_confidence={floor:g}"
        return {"policy": name, "operating_point": "p", "min_confidence": floor, "accuracy": accuracy,
                "agreement": agreement, "saved_ratio": 0.5, "fallback_share": 0.0}  # fmt: skip

    return [row(None, 0.5, 0.5), row(0.5, 0.75, 0.75), row(0.75, 0.875, 0.875)]


def test_the_guard_of_a_point_served_with_a_floor_stands_in_for_it_with_a_higher_floor():
    # Alone the point disagrees 50% of the time: floor 0.5 halves that. Served with 0.5 (25%), the guard needs a
    # floor above it: 0.75 (12.5%, exactly half).
    assert choose_guard(guard_rows(), "p")["min_confidence"] == 0.5
    chosen = choose_guard(guard_rows(), "p", 0.5)

    assert chosen["min_confidence"] == 0.75
    assert chosen["served_validation"] == {"accuracy": 0.75, "agreement": 0.75, "saved_ratio": 0.5}
    assert choose_guard(guard_rows(), "p", 0.75)["policy"] is None  # nothing above the highest floor


STORE = Path(__file__).resolve().parents[2] / "store"


@pytest.mark.parametrize("value", ["0.5", 1.5, -0.1, True])
def test_a_store_whose_served_floor_is_not_a_probability_is_refused_naming_the_field(tmp_path, value):
    copy = tmp_path / "store"
    shutil.copytree(STORE, copy)
    manifest_path = copy / "shapes" / "1" / "model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["router"]["min_confidence"] = value
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(StoreError, match="router.min_confidence"):
        load_model(copy, "shapes")


def test_a_store_without_a_served_floor_serves_the_router_alone(tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(STORE, copy)
    manifest_path = copy / "shapes" / "1" / "model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["router"].pop("min_confidence", None)
    manifest_path.write_text(json.dumps(manifest))

    assert load_model(copy, "shapes").default_min_confidence is None
