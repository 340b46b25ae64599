"""Routing policy: from router scores to the one expert each request runs, and who decided it.

NumPy only. The served pipeline and the evaluation both call these functions, so the figures in an
evaluation table are those of the policy the server applies.

Order of precedence for one request:
    request            the client forced an expert (``route=<name>``), or asked for DRDF's soft fusion
    missing_modality   the request lacks a modality: the best-scored expert that needs only what it has
    threshold          the router's pick is cheaper than the full path but its calibrated score is below
                       the request's threshold: escalate to the full path
    router             otherwise the router's argmax
and after the chosen expert ran:
    confidence         it was cheaper than the full path and its top probability is below the request's
                       min_confidence: the full path runs too, and its answer is the one returned

"Cheaper" is by MAdds of the routed path (``path_madds``), not "any expert but the full one": the full path is
the most accurate expert, not always the most expensive (on the default model ``muse`` costs more than ``mi2p``),
and escalating from a dearer expert to it would spend more to answer worse.
"""

from __future__ import annotations

import numpy as np

DECIDED_BY = ("router", "threshold", "request", "missing_modality", "confidence")
ROUTER, THRESHOLD, REQUEST, MISSING_MODALITY, CONFIDENCE = range(len(DECIDED_BY))
NOT_FORCED = -1


def calibrate(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled scores: softmax(log(scores) / T), rows summing to 1 (T = 1 leaves them as they are).

    Scaling keeps every row's order, so the router's choice is the same; only how sure it says it is changes,
    which is what a threshold reads."""
    if temperature == 1.0:
        return scores
    logits = np.log(np.clip(scores, 1e-30, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(scores: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimizes the negative log-likelihood of ``targets`` (N,) under ``scores`` (N, E):
    temperature scaling, by a search over log T (one parameter, a smooth convex-shaped curve)."""
    log_scores = np.log(np.clip(scores, 1e-30, None))

    def nll(log_t: float) -> float:
        logits = log_scores / np.exp(log_t)
        logits = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        return float((log_norm - logits[np.arange(len(targets)), targets]).mean())

    low, high = np.log(0.05), np.log(50.0)
    for _ in range(60):  # golden-section search
        a, b = high - 0.618 * (high - low), low + 0.618 * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def cheaper_than_full(path_madds: np.ndarray, full_index: int) -> np.ndarray:
    """(E,) bool: the experts whose routed path costs fewer MAdds than the full path's, the only ones a threshold
    or a confidence floor escalates from."""
    path_madds = np.asarray(path_madds)
    return path_madds < path_madds[full_index]


def confidence_fallback(
    choice: np.ndarray, top_probability: np.ndarray, path_madds: np.ndarray, full_index: int, min_confidence: np.ndarray
) -> np.ndarray:
    """(N,) bool: requests whose expert, cheaper than the full path (``path_madds`` (E,)), answered with a top
    probability below their min_confidence (NaN: no fallback) and so also run the full path."""
    with np.errstate(invalid="ignore"):
        return cheaper_than_full(path_madds, full_index)[choice] & (top_probability < min_confidence)


def decide_routes(
    scores: np.ndarray,  # (N, E) router scores, rows sum to 1
    full_index: int,  # the full-fusion expert's column
    *,
    path_madds: np.ndarray,  # (E,) MAdds of a request routed to each expert: a threshold escalates cheaper ones only
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
            escalate = complete & cheaper_than_full(path_madds, full_index)[choice] & (chosen_score < thresholds)
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
