"""Which router is served: every router's policy table on a split (models/evaluation.py's policies over the
cached expert outputs and the routers' scores), and the choice among them.

Stage II (models/training.py) calls these on validation, on its reworded copies and on the test splits; export
(export/safety.py) reads a split the same way to measure the model's safety figures.
"""

from __future__ import annotations

import torch.nn.functional as F

from models.data.tensors import TensorSplit
from models.evaluation import RoutingOutputs, evaluate_policies
from models.safety import CONFIDENCE_FLOORS, floor_policies


def evaluate_split(
    *,
    model,
    routers: list[dict],
    costs: dict,
    full_expert: str,
    outputs: dict,
    split: TensorSplit,
    routes: dict,
    default_router: str | None = None,
    default_min_confidence: float | None = None,
) -> list[dict]:
    """The policy table of one split; ``routes`` holds each router's scores and importance on it."""
    routing = routing_outputs(
        model=model,
        split=split,
        routers=routers,
        costs=costs,
        full_expert=full_expert,
        outputs=outputs,
        routes=routes,
        default_router=default_router,
        default_min_confidence=default_min_confidence,
    )
    return evaluate_policies(routing)


def routing_outputs(
    *,
    model,
    split: TensorSplit,
    routers: list[dict],
    costs: dict,
    full_expert: str,
    outputs: dict,
    routes: dict,
    default_router: str | None = None,
    default_min_confidence: float | None = None,
) -> RoutingOutputs:
    """What a model produced on one split (``outputs``: ``expert_outputs``; ``routes``: each router's scores,
    importance and weights), as the policy evaluation and the safety measurements read it."""
    return RoutingOutputs(
        labels=split.labels.numpy(),
        expert_probs={e: F.softmax(v, dim=1).numpy() for e, v in outputs["logits"].items()},
        router_scores={name: r["scores"].numpy() for name, r in routes.items()},
        router_importance={name: r["importance"].numpy() for name, r in routes.items() if "importance" in r} or None,
        router_weights={name: r["weights"].numpy() for name, r in routes.items() if "weights" in r} or None,
        temperatures={r["name"]: r["temperature"] for r in routers},
        shared_madds=sum(costs["components"][c] for c in model.shared_encoders.values())
        + costs["components"]["router"],
        component_madds=costs["components"],
        expert_components={e.name: e.components for e in model.experts},
        routers=[{"name": r["name"], "lambda": r["lambda"]} for r in routers],
        default_router=default_router or routers[0]["name"],
        default_min_confidence=default_min_confidence,
        experts=[e.name for e in model.experts],
        path_madds=costs["path"],
        static_madds=costs["static"],
        madds_full=costs["full"],
        full_expert=full_expert,
        kinds=split.kinds,
    )


def policy_figures(row: dict) -> dict:
    return {k: row[k] for k in ("policy", "accuracy", "saved_ratio")}


def select_policy(
    validation: RoutingOutputs, routers: list[dict], tolerance: float, reworded: list[RoutingOutputs] = ()
) -> tuple[str, float | None]:
    """The served policy, (router, confidence floor or None). A policy holds up when its accuracy is within
    ``tolerance`` of the full path's on the validation split and on each of its reworded copies (``reworded``: the
    same samples, captions with words dropped, routed likewise). Served: the cheapest router alone that holds up;
    when none does, the cheapest router with a floor of ``CONFIDENCE_FLOORS`` that does (the full path runs too
    where the routed expert's top probability is below the floor).

    A router alone first: it runs one expert per request, as DynMM promises, while a floor runs two for the
    answers it escalates (and pays their latency twice). A floor still lets a cheaper router serve when no router
    alone holds up: its confident answers stay cheap, and the ones it is unsure of (unseen wording among them) go
    to the full path. Among floors of equal cost, the lowest. When no policy holds up, the most accurate router
    alone on validation (as ``select_router``)."""
    tables = [validation, *reworded]

    def figures(outputs: RoutingOutputs, name: str) -> dict:
        return {(row["min_confidence"]): row for row in floor_policies(outputs, name)}

    full_accuracy = [float((t.expert_probs[t.full_expert].argmax(axis=1) == t.labels).mean()) for t in tables]
    by_router = {r["name"]: [figures(t, r["name"]) for t in tables] for r in routers}
    candidates = [
        (name, floor, rows[0][floor]["saved_ratio"])
        for name, rows in by_router.items()
        for floor in (None, *CONFIDENCE_FLOORS)
        if all(table[floor]["accuracy"] >= full - tolerance for table, full in zip(rows, full_accuracy, strict=True))
    ]
    alone = [c for c in candidates if c[1] is None]
    if alone or candidates:
        name, floor, _ = min(alone or candidates, key=lambda c: (-c[2], c[1] or 0.0))
        return name, floor
    on_validation = {name: rows[0][None] for name, rows in by_router.items()}
    best = max(on_validation, key=lambda name: (on_validation[name]["accuracy"], on_validation[name]["saved_ratio"]))
    return best, None
