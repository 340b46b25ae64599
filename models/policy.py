"""Routing policy: from router scores to the one expert each request runs, and who decided it.

NumPy only. The served pipeline and the evaluation both call ``decide_routes``, so the figures in
an evaluation table are those of the policy the server applies.

Order of precedence for one request:
    request            the client forced an expert (``route=<name>``)
    missing_modality   the request lacks a modality: the best-scored expert that needs only what it has
    threshold          the router's pick is cheaper than the full path but its score is below the
                       request's threshold: escalate to the full path
    router             otherwise the router's argmax
"""

from __future__ import annotations

import numpy as np

DECIDED_BY = ("router", "threshold", "request", "missing_modality")
ROUTER, THRESHOLD, REQUEST, MISSING_MODALITY = range(len(DECIDED_BY))
NOT_FORCED = -1


def decide_routes(
    scores: np.ndarray,  # (N, E) router scores, rows sum to 1
    full_index: int,  # the full-fusion expert's column
    *,
    forced: np.ndarray | None = None,  # (N,) expert index the request forces, or NOT_FORCED
    thresholds: np.ndarray | None = None,  # (N,) escalation threshold in [0, 1], NaN for none
    eligible: np.ndarray | None = None,  # (N, E) bool: the request has every modality the expert needs
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (expert index (N,), decided_by code (N,)) with codes indexing ``DECIDED_BY``."""
    n, num_experts = scores.shape
    eligible = np.ones((n, num_experts), dtype=bool) if eligible is None else eligible
    assert eligible.shape == (n, num_experts), f"eligible {eligible.shape} != scores {scores.shape}"
    assert eligible.any(axis=1).all(), "every request needs at least one eligible expert"

    choice = np.where(eligible, scores, -np.inf).argmax(axis=1)
    complete = eligible.all(axis=1)
    decided_by = np.where(complete, ROUTER, MISSING_MODALITY)

    if thresholds is not None:
        chosen_score = scores[np.arange(n), choice]
        with np.errstate(invalid="ignore"):  # NaN thresholds compare False: no escalation
            escalate = complete & (choice != full_index) & (chosen_score < thresholds)
        choice = np.where(escalate, full_index, choice)
        decided_by = np.where(escalate, THRESHOLD, decided_by)

    if forced is not None:
        is_forced = forced != NOT_FORCED
        assert eligible[is_forced, forced[is_forced]].all(), "a forced expert lacks a modality it needs"
        choice = np.where(is_forced, forced, choice)
        decided_by = np.where(is_forced, REQUEST, decided_by)

    return choice, decided_by


def oracle_routes(correct: np.ndarray, path_madds: np.ndarray, full_index: int) -> np.ndarray:
    """The cheapest expert that is right, else the full path. ``correct`` (N, E) bool, ``path_madds`` (E,)."""
    by_cost = np.argsort(path_madds, kind="stable")
    right_in_cost_order = correct[:, by_cost]  # (N, E)
    first_right = right_in_cost_order.argmax(axis=1)
    return np.where(right_in_cost_order.any(axis=1), by_cost[first_right], full_index)
