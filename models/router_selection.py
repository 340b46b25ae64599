"""Which router is served: every router's policy table on a split (models/evaluation.py's policies over the
cached expert outputs and the routers' scores), and the choice among them.

Stage II (models/training.py) calls these on validation, on its reworded copies and on the test splits; export
(export/safety.py) reads a split the same way to measure the model's safety figures.
"""

from __future__ import annotations

import torch.nn.functional as F

from models.data.tensors import TensorSplit
from models.evaluation import RoutingOutputs, evaluate_policies, find_row


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
        experts=[e.name for e in model.experts],
        path_madds=costs["path"],
        static_madds=costs["static"],
        madds_full=costs["full"],
        full_expert=full_expert,
        kinds=split.kinds,
    )


def policy_figures(row: dict) -> dict:
    return {k: row[k] for k in ("policy", "accuracy", "saved_ratio")}


def select_router(
    validation_rows: list[dict], routers: list[dict], tolerance: float, reworded: list[list[dict]] = ()
) -> str:
    """The cheapest router whose validation accuracy is within ``tolerance`` of the full expert's, on the
    validation split and on each of its reworded copies (``reworded``: their policy tables)."""
    full_accuracy = find_row(validation_rows, "full")["accuracy"]
    candidates = [find_row(validation_rows, f"lambda={r['lambda']:g}") | {"name": r["name"]} for r in routers]

    def holds_up(candidate: dict) -> bool:
        return all(
            find_row(rows, candidate["policy"])["accuracy"] >= find_row(rows, "full")["accuracy"] - tolerance
            for rows in reworded
        )

    good = [c for c in candidates if c["accuracy"] >= full_accuracy - tolerance and holds_up(c)]
    if good:
        return min(good, key=lambda c: c["madds_per_sample"])["name"]
    return max(candidates, key=lambda c: (c["accuracy"], -c["madds_per_sample"]))["name"]
