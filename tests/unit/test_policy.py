"""Routing policy: request > missing modality > threshold > router."""

from __future__ import annotations

import numpy as np
import pytest

from models.policy import (
    DECIDED_BY,
    NOT_FORCED,
    calibrate,
    confidence_fallback,
    decide_routes,
    fit_temperature,
    oracle_routes,
)

TEXT, IMAGE, FULL = 0, 1, 2
COST = np.array([10, 50, 100])  # MAdds of each routed path: text < image < full
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
    choice, by = decide_routes(SCORES, FULL, path_madds=COST)
    assert choice.tolist() == [TEXT, TEXT, FULL, IMAGE]
    assert decided(by) == ["router"] * 4


def test_a_threshold_escalates_cheaper_picks_scored_below_it():
    choice, by = decide_routes(SCORES, FULL, path_madds=COST, thresholds=np.full(4, 0.6))
    assert choice.tolist() == [TEXT, FULL, FULL, IMAGE]
    assert decided(by) == ["router", "threshold", "router", "router"]


def test_threshold_nan_means_none():
    choice, _ = decide_routes(SCORES, FULL, path_madds=COST, thresholds=np.array([np.nan, np.nan, 0.99, 0.99]))
    assert choice.tolist() == [TEXT, TEXT, FULL, FULL]


def test_missing_modality_keeps_to_eligible_experts_and_ignores_the_threshold():
    text_only = np.array([[True, False, False]] * 4)
    choice, by = decide_routes(SCORES, FULL, path_madds=COST, thresholds=np.full(4, 1.0), eligible=text_only)
    assert choice.tolist() == [TEXT] * 4
    assert decided(by) == ["missing_modality"] * 4


def test_a_forced_route_wins():
    forced = np.array([FULL, NOT_FORCED, IMAGE, NOT_FORCED])
    choice, by = decide_routes(SCORES, FULL, path_madds=COST, forced=forced, thresholds=np.full(4, 0.6))
    assert choice.tolist() == [FULL, FULL, IMAGE, IMAGE]
    assert decided(by) == ["request", "threshold", "request", "router"]


def test_the_oracle_takes_the_cheapest_right_expert_else_full():
    correct = np.array([[True, True, True], [False, True, True], [False, False, False], [False, True, False]])
    cost = np.array([1.0, 5.0, 6.0])
    assert oracle_routes(correct, cost, FULL).tolist() == [TEXT, IMAGE, FULL, IMAGE]


def test_calibration_keeps_the_choice_and_changes_only_how_sure_it_is():
    hot, cool = calibrate(SCORES, 0.5), calibrate(SCORES, 4.0)
    assert np.array_equal(hot.argmax(1), SCORES.argmax(1))
    assert np.array_equal(cool.argmax(1), SCORES.argmax(1))
    assert np.allclose(hot.sum(1), 1) and np.allclose(cool.sum(1), 1)  # noqa: PT018
    assert (hot.max(1) > SCORES.max(1)).all()
    assert (cool.max(1) < SCORES.max(1)).all()
    assert calibrate(SCORES, 1.0) is SCORES


def test_temperature_scaling_finds_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (4000, 4))
    true_temperature = 2.5  # the scores are 2.5 times too sure of themselves
    probabilities = np.exp(logits / true_temperature)
    probabilities /= probabilities.sum(1, keepdims=True)
    targets = np.array([rng.choice(4, p=p) for p in probabilities])
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fit_temperature(scores, targets) == pytest.approx(true_temperature, rel=0.1)


def test_the_confidence_fallback_takes_unsure_cheaper_answers_only():
    choice = np.array([TEXT, TEXT, FULL, IMAGE, TEXT])
    top = np.array([0.95, 0.40, 0.30, 0.60, 0.40])
    floors = np.array([0.7, 0.7, 0.7, 0.7, np.nan])  # the last request set no floor
    assert confidence_fallback(choice, top, COST, FULL, floors).tolist() == [False, True, False, True, False]


def test_neither_a_threshold_nor_a_confidence_floor_escalates_from_an_expert_dearer_than_the_full_path():
    """The full path is the most accurate expert, not always the dearest (the default model's muse costs more than
    its full path mi2p): escalating from a dearer one would spend more. Here the image path costs 150 > 100."""
    dear_image = np.array([10, 150, 100])
    choice, by = decide_routes(SCORES, FULL, path_madds=dear_image, thresholds=np.full(4, 0.99))
    assert choice.tolist() == [FULL, FULL, FULL, IMAGE]  # the text picks escalate, the image pick stays
    assert decided(by) == ["threshold", "threshold", "router", "router"]
    top = np.array([0.4, 0.4, 0.4, 0.4])
    fallback = confidence_fallback(np.array([TEXT, IMAGE, FULL, IMAGE]), top, dear_image, FULL, np.full(4, 0.9))
    assert fallback.tolist() == [True, False, False, False]
    # an expert exactly as dear as the full path saves nothing by answering alone: it is not escalated either
    tied = np.array([10, 100, 100])
    assert decide_routes(SCORES, FULL, path_madds=tied, thresholds=np.full(4, 0.99))[0].tolist()[3] == IMAGE


# -- the edges a mutation run showed untested ------------------------------------------------------------------


def test_a_score_exactly_at_the_threshold_or_floor_is_sure_enough():
    """Escalation is for a score *below* the threshold, a fallback for a top probability *below* the floor."""
    at_the_line = np.array([[0.6, 0.1, 0.3]])
    choice, by = decide_routes(at_the_line, FULL, path_madds=COST, thresholds=np.array([0.6]))
    assert (choice.tolist(), decided(by)) == ([TEXT], ["router"])
    assert confidence_fallback(np.array([TEXT]), np.array([0.7]), COST, FULL, np.array([0.7])).tolist() == [False]
    assert confidence_fallback(np.array([TEXT]), np.array([0.69]), COST, FULL, np.array([0.7])).tolist() == [True]


def test_a_request_with_no_eligible_expert_or_a_forced_one_it_cannot_feed_is_refused_by_name():
    none_eligible = np.array([[True, False, False], [False, False, False], [True, True, True], [True, True, True]])
    with pytest.raises(AssertionError, match="^every request needs at least one eligible expert$"):
        decide_routes(SCORES, FULL, path_madds=COST, eligible=none_eligible)
    text_only = np.array([[True, False, False]] * 4)
    forced = np.array([NOT_FORCED, IMAGE, NOT_FORCED, NOT_FORCED])
    with pytest.raises(AssertionError, match="^a forced expert lacks a modality it needs$"):
        decide_routes(SCORES, FULL, path_madds=COST, eligible=text_only, forced=forced)


def test_nan_thresholds_and_floors_compare_without_a_warning():
    with np.errstate(invalid="raise"):  # what a server configured to raise on invalid float operations would do
        choice, _ = decide_routes(SCORES, FULL, path_madds=COST, thresholds=np.full(4, np.nan))
        fallback = confidence_fallback(np.array([TEXT]), np.array([0.4]), COST, FULL, np.array([np.nan]))
    assert choice.tolist() == [TEXT, TEXT, FULL, IMAGE]
    assert fallback.tolist() == [False]


def test_calibration_of_very_sure_and_very_unsure_rows_together_stays_finite():
    """Each row is scaled on its own: a sharp temperature would underflow a flat row if rows shared one maximum."""
    rows = np.array([[0.999, 0.001, 0.0], [0.5, 0.5, 0.0]])  # zero scores too: log(0) must not be taken
    with np.errstate(divide="raise", invalid="raise"):
        sharp = calibrate(rows, 1e-4)
    assert sharp == pytest.approx(np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]), abs=1e-9)
    with np.errstate(divide="raise", invalid="raise"):
        assert calibrate(np.array([[0.0, 0.0, 1.0]]), 2.0) == pytest.approx(np.array([[0.0, 0.0, 1.0]]), abs=1e-9)


def nll_by_hand(scores: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """The negative log-likelihood of temperature-scaled scores, written out plainly (no shared code)."""
    total = 0.0
    for row, target in zip(scores, targets, strict=True):
        scaled = [p ** (1.0 / temperature) for p in row]  # softmax(log p / T) = p^(1/T) / sum
        total -= np.log(scaled[target] / sum(scaled))
    return total / len(targets)


@pytest.mark.parametrize("true_temperature", [0.4, 2.5])
def test_temperature_scaling_finds_the_minimum_of_the_likelihood_either_side_of_one(true_temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (600, 3))
    probabilities = np.exp(logits / true_temperature)
    probabilities /= probabilities.sum(1, keepdims=True)
    targets = np.array([rng.choice(3, p=p) for p in probabilities])
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 161))  # steps of 2.9%
    best = grid[int(np.argmin([nll_by_hand(scores, targets, t) for t in grid]))]
    assert fit_temperature(scores, targets) == pytest.approx(best, rel=0.03)


def test_scores_that_say_nothing_of_the_labels_get_the_largest_temperature_searched():
    scores = np.array([[0.7, 0.2, 0.1]] * 300)
    targets = np.arange(300) % 3  # each label as often, whatever the scores say: the flattest scaling fits best
    assert fit_temperature(scores, targets) == pytest.approx(50.0, rel=0.01)


def test_temperature_scaling_takes_zero_scores_without_log_of_zero():
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.3]])
    with np.errstate(divide="raise", invalid="raise"):
        temperature = fit_temperature(scores, np.array([0, 1, 0]))
    assert 0.05 <= temperature <= 50.0


def test_the_oracle_breaks_a_tie_in_cost_by_the_routers_order_among_many_experts():
    """Among experts of one cost the first in the router's order is the cheapest; with more experts than NumPy's
    insertion sort handles (16), only a stable sort keeps that order (this one is where its quicksort does not)."""
    costs = np.array([2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 2, 2, 1, 1, 2,
                      1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 2, 1])  # fmt: skip
    correct = np.ones((1, len(costs)), dtype=bool)
    assert oracle_routes(correct, costs, 0).tolist() == [2]  # the first of cost 1
