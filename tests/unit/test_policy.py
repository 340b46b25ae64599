"""Routing policy: request > missing modality > threshold > router."""

from __future__ import annotations

import numpy as np

from models.policy import DECIDED_BY, NOT_FORCED, decide_routes, oracle_routes

TEXT, IMAGE, FULL = 0, 1, 2
SCORES = np.array(
    [
        [0.90, 0.05, 0.05],  # confident text
        [0.55, 0.05, 0.40],  # hesitant text
        [0.10, 0.10, 0.80],  # full
        [0.20, 0.70, 0.10],  # image
    ]
)


def decided(codes):
    return [DECIDED_BY[c] for c in codes]


def test_the_router_picks_the_argmax():
    choice, by = decide_routes(SCORES, FULL)
    assert choice.tolist() == [TEXT, TEXT, FULL, IMAGE]
    assert decided(by) == ["router"] * 4


def test_a_threshold_escalates_cheaper_picks_scored_below_it():
    choice, by = decide_routes(SCORES, FULL, thresholds=np.full(4, 0.6))
    assert choice.tolist() == [TEXT, FULL, FULL, IMAGE]
    assert decided(by) == ["router", "threshold", "router", "router"]


def test_threshold_nan_means_none():
    choice, _ = decide_routes(SCORES, FULL, thresholds=np.array([np.nan, np.nan, 0.99, 0.99]))
    assert choice.tolist() == [TEXT, TEXT, FULL, FULL]


def test_missing_modality_keeps_to_eligible_experts_and_ignores_the_threshold():
    text_only = np.array([[True, False, False]] * 4)
    choice, by = decide_routes(SCORES, FULL, thresholds=np.full(4, 1.0), eligible=text_only)
    assert choice.tolist() == [TEXT] * 4
    assert decided(by) == ["missing_modality"] * 4


def test_a_forced_route_wins():
    forced = np.array([FULL, NOT_FORCED, IMAGE, NOT_FORCED])
    choice, by = decide_routes(SCORES, FULL, forced=forced, thresholds=np.full(4, 0.6))
    assert choice.tolist() == [FULL, FULL, IMAGE, IMAGE]
    assert decided(by) == ["request", "threshold", "request", "router"]


def test_the_oracle_takes_the_cheapest_right_expert_else_full():
    correct = np.array([[True, True, True], [False, True, True], [False, False, False], [False, True, False]])
    cost = np.array([1.0, 5.0, 6.0])
    assert oracle_routes(correct, cost, FULL).tolist() == [TEXT, IMAGE, FULL, IMAGE]
