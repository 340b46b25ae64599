"""What "routing is safe" means for one model, measured on validation: the figures the server's audits, guard
and "uncertain" flag compare live traffic against (DESIGN.md "Is routing still safe?").

NumPy only. Training measures them on the validation split with cross-fitted routes (each sample routed by
routers that did not train on it), the same outputs the operating points' validation figures come from, and
export writes them into ``model.json`` under ``safety``:

- ``expert_temperatures``: each expert's class probabilities calibrated by temperature scaling, so that "the
  answering path's calibrated top probability" means the same for every path.
- ``operating_points``: per router, the agreement of its cheaper answers with the full path's answer to the
  same input (what a shadow audit measures live), overall and per expert, and the share of answers it routes
  to a cheaper expert.
- ``policies``: every operating point alone and with each confidence floor of ``CONFIDENCE_FLOORS`` (the full
  path runs too when the cheaper expert's top probability is below it), with accuracy, agreement with the full
  path over all answers, and MAdds saved.
- ``guard``: per operating point, the safer policy the guard serves when live agreement falls (``choose_guard``).
"""

from __future__ import annotations

import numpy as np

from models.evaluation import RoutingOutputs
from models.policy import calibrate, decide_routes, fit_temperature

CONFIDENCE_FLOORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The safer policy disagrees with the full path at most this share as often as the served point does, on validation.
GUARD_DISAGREEMENT_SHARE = 0.5
GUARD_RULE = (
    "the served point with the lowest confidence floor (above the one it is served with) that makes it disagree "
    "with the full path at most "
    f"{GUARD_DISAGREEMENT_SHARE:g} times as often as it does alone, at no loss of accuracy, on validation; "
    "when no floor goes that far, the floor that disagrees least, if it disagrees less than the point alone"
)


def policy_name(operating_point: str, min_confidence: float | None) -> str:
    """A policy's label (metrics, logs): the point, and its confidence floor when it has one."""
    return operating_point if min_confidence is None else f"{operating_point}+min_confidence={min_confidence:g}"


def measure(outputs: RoutingOutputs) -> dict:
    """The ``safety`` section of model.json from one split's outputs (validation, cross-fitted routes)."""
    experts, n = outputs.experts, len(outputs.labels)
    full = experts.index(outputs.full_expert)
    path_madds = np.array([outputs.path_madds[e] for e in experts], dtype=np.float64)
    answers = np.stack([outputs.expert_probs[e].argmax(axis=1) for e in experts], axis=1)  # (N, E)
    agrees = answers == answers[:, full : full + 1]  # (N, E): each expert's answer is the full path's
    points = {
        router["name"]: _point_figures(
            decide_routes(outputs.router_scores[router["name"]], full, path_madds=path_madds)[0], agrees, experts, full
        )
        for router in outputs.routers
    }
    served_floor = {outputs.default_router: outputs.default_min_confidence}
    policies = [
        row
        for router in outputs.routers
        for row in floor_policies(outputs, router["name"], _floors(served_floor.get(router["name"])))
    ]
    temperatures = {e: round(fit_temperature(outputs.expert_probs[e], outputs.labels), 4) for e in experts}
    return {
        "split": "val",
        "samples": n,
        "expert_temperatures": temperatures,
        "operating_points": points,
        "policies": policies,
        "guard": {name: choose_guard(policies, name, served_floor.get(name)) for name in points},
        "guard_rule": GUARD_RULE,
    }


def _floors(served: float | None) -> tuple[float, ...]:
    """The floors measured for a point: ``CONFIDENCE_FLOORS``, and the one it is served with."""
    return tuple(sorted({*CONFIDENCE_FLOORS, *([] if served is None else [served])}))


def _point_figures(choice: np.ndarray, agrees: np.ndarray, experts: list[str], full: int) -> dict:
    """Agreement of a router's cheaper answers with the full path (what an audit measures)."""
    n = len(choice)
    answered = agrees[np.arange(n), choice]  # (N,)
    cheaper = choice != full
    by_expert = {
        expert: {"agreement": float(answered[choice == e].mean()), "answers": int((choice == e).sum())}
        for e, expert in enumerate(experts)
        if e != full and (choice == e).any()
    }
    return {
        "agreement": float(answered[cheaper].mean()) if cheaper.any() else 1.0,
        "cheaper_share": float(cheaper.mean()),
        "by_expert": by_expert,
    }


def floor_policies(outputs: RoutingOutputs, point: str, floors=CONFIDENCE_FLOORS) -> list[dict]:
    """The point alone and with each confidence floor of ``floors``: accuracy, agreement with the full path over
    all answers, MAdds saved, and the share that fell back to the full path."""
    experts, n = outputs.experts, len(outputs.labels)
    full = experts.index(outputs.full_expert)
    path_madds = np.array([outputs.path_madds[e] for e in experts], dtype=np.float64)
    answers = np.stack([outputs.expert_probs[e].argmax(axis=1) for e in experts], axis=1)  # (N, E)
    agrees = answers == answers[:, full : full + 1]
    choice, _ = decide_routes(outputs.router_scores[point], full, path_madds=path_madds)
    rows = []
    for floor in (None, *floors):
        final, madds, fallback = outputs.with_floor(choice, floor)
        rows.append(
            {
                "policy": policy_name(point, floor),
                "operating_point": point,
                "min_confidence": floor,
                "accuracy": float((answers[np.arange(n), final] == outputs.labels).mean()),
                "agreement": float(agrees[np.arange(n), final].mean()),
                "saved_ratio": float(1.0 - madds.mean() / outputs.madds_full),
                "fallback_share": float(fallback.mean()),
            }
        )
    return rows


def choose_guard(policies: list[dict], served: str, floor: float | None = None) -> dict:
    """The safer policy for ``served`` (``GUARD_RULE``), with its validation figures; ``None`` as its floor when
    none is safer (the point never disagrees with the full path on validation, or no floor lowers its disagreement
    without costing accuracy). ``floor``: the confidence floor the point is served with (model.json
    ``router.min_confidence``): the policy the guard stands in for is the point with it, and only higher floors
    are safer.

    Only floors on the served point are candidates: a floor leaves the router's picks as they are, so the audits
    made while the guard is on still measure the point the guard stands in for (service/guard.py). A floor short
    of the halving target still stands: a guard that can never engage protects nobody (the default model's served
    point once had its best floor at 2.42% disagreement against a target of 2.375%, and shipped with no guard)."""
    own = [p for p in policies if p["operating_point"] == served]
    base = next(p for p in own if p["min_confidence"] == floor)
    safer = [
        p
        for p in own
        if p["min_confidence"] is not None
        and p["min_confidence"] > (floor or 0.0)
        and p["agreement"] > base["agreement"]
        and p["accuracy"] >= base["accuracy"]
    ]
    if not safer or base["agreement"] >= 1.0:
        return {"operating_point": served, "min_confidence": None, "policy": None}
    limit = GUARD_DISAGREEMENT_SHARE * (1.0 - base["agreement"])
    halving = [p for p in safer if 1.0 - p["agreement"] <= limit]
    if halving:
        best = min(halving, key=lambda p: p["min_confidence"])
    else:
        best = max(safer, key=lambda p: (p["agreement"], -p["min_confidence"]))
    return {
        "operating_point": best["operating_point"],
        "min_confidence": best["min_confidence"],
        "policy": best["policy"],
        "validation": {k: best[k] for k in ("accuracy", "agreement", "saved_ratio", "fallback_share")},
        "served_validation": {k: base[k] for k in ("accuracy", "agreement", "saved_ratio")},
    }


def calibrated_confidence(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """(N,) the top class probability after temperature scaling."""
    return calibrate(np.asarray(probabilities, np.float64), temperature).max(axis=1)
