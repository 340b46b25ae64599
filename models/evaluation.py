"""Accuracy against compute: the policy table (full, cheap, auto, oracle, thresholds, one row per lambda)
and the Pareto plot.

NumPy only (matplotlib is imported when a plot is asked for). Training evaluates eager PyTorch
outputs with it; ``dynfuse evaluate`` evaluates the exported store's outputs with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.policy import calibrate, confidence_fallback, decide_routes, oracle_routes

# Thresholds apply to the router's calibrated scores (temperature-scaled on validation), so [0.5, 0.99]
# is the useful range.
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DEFAULT_CONFIDENCES = (0.5, 0.7, 0.9)


@dataclass
class RoutingOutputs:
    """What one model produced on one split, enough to evaluate every policy without rerunning it."""

    labels: np.ndarray  # (N,) true class indices
    expert_probs: dict[str, np.ndarray]  # expert -> (N, K) class probabilities
    router_scores: dict[str, np.ndarray]  # router name -> (N, E) scores; see ``routers``
    routers: list[dict]  # [{"name", "lambda"}], in sweep order
    default_router: str  # the router the server uses for route=auto
    experts: list[str]  # expert order of the score columns
    path_madds: dict[str, int]  # expert -> MAdds of a routed request taking it (encoders + router + expert)
    static_madds: dict[str, int]  # expert -> MAdds of that expert as a static model (no glimpse, no router)
    madds_full: int  # the static full model
    full_expert: str
    kinds: list[str] | None = None  # optional per-sample category, for a per-kind breakdown
    router_importance: dict[str, np.ndarray] | None = None  # router name -> (N, 2) text, image importance
    router_weights: dict[str, np.ndarray] | None = None  # router name -> (N, E) fused weights: DRDF's soft fusion
    temperatures: dict[str, float] = field(default_factory=dict)  # router name -> its calibration (default 1)
    # What several experts cost together (soft fusion, a confidence fallback): the encoders and the router,
    # then each component of their chains once. Without these, only single-expert policies are evaluated.
    shared_madds: int | None = None
    component_madds: dict[str, int] | None = None
    expert_components: dict[str, tuple[str, ...]] | None = None
    extra: dict = field(default_factory=dict)
    # The confidence floor served with ``default_router`` (model.json ``router.min_confidence``): ``auto`` runs the
    # full path too where the routed expert's top probability is below it. None: the router's picks alone.
    default_min_confidence: float | None = None

    def with_floor(self, choice: np.ndarray, floor: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(final, madds, fallback), each (N,): the expert that answers, what the request cost, and whether the
        full path ran too because ``choice``'s expert (cheaper than it) answered with a top probability below
        ``floor`` (None: never), as the served pipeline's cascade does."""
        experts, n = self.experts, len(choice)
        full = experts.index(self.full_expert)
        path_madds = np.array([self.path_madds[e] for e in experts], dtype=np.float64)
        top = np.stack([self.expert_probs[e].max(axis=1) for e in experts], axis=1)[np.arange(n), choice]
        fallback = confidence_fallback(choice, top, path_madds, full, np.full(n, np.nan if floor is None else floor))
        both = np.array([self.madds_of({e, self.full_expert}) for e in experts], dtype=np.float64)
        return np.where(fallback, full, choice), np.where(fallback, both[choice], path_madds[choice]), fallback

    def madds_of(self, experts: set[str]) -> int:
        """A request that ran every expert of ``experts``: encoders, router and each component once."""
        components = {c for e in experts for c in self.expert_components[e]}
        return self.shared_madds + sum(self.component_madds[c] for c in components)


def evaluate_policies(
    outputs: RoutingOutputs, thresholds=DEFAULT_THRESHOLDS, confidences=DEFAULT_CONFIDENCES
) -> list[dict]:
    """The rows of ``dynfuse evaluate --json``: policy, accuracy, madds_per_sample, saved_ratio, route_mix."""
    experts = outputs.experts
    predictions = np.stack([outputs.expert_probs[e].argmax(axis=1) for e in experts], axis=1)  # (N, E)
    correct = predictions == outputs.labels[:, None]  # (N, E)
    path_madds = np.array([outputs.path_madds[e] for e in experts], dtype=np.float64)
    full_index = experts.index(outputs.full_expert)
    cheapest = min(experts, key=lambda e: outputs.static_madds[e])
    n = len(outputs.labels)

    def routed_row(policy: str, choice: np.ndarray, **extra) -> dict:
        return _row(policy, outputs, correct[np.arange(n), choice], path_madds[choice], choice, **extra)

    def static_row(policy: str, expert: str) -> dict:
        index = experts.index(expert)
        madds = np.full(n, float(outputs.static_madds[expert]))
        return _row(policy, outputs, correct[:, index], madds, np.full(n, index), expert=expert)

    rows = [static_row("full", outputs.full_expert), static_row("cheap", cheapest)]
    rows += [static_row(f"static:{e}", e) for e in experts]  # every expert alone, full and cheap included
    default_scores = outputs.router_scores[outputs.default_router]
    auto_choice = decide_routes(default_scores, full_index, path_madds=path_madds)[0]
    if outputs.default_min_confidence is not None and outputs.expert_components is not None:
        final, madds, fallback = outputs.with_floor(auto_choice, outputs.default_min_confidence)
        auto = _row("auto", outputs, correct[np.arange(n), final], madds, final, router=outputs.default_router,
                    min_confidence=outputs.default_min_confidence, fallback_share=float(fallback.mean()))  # fmt: skip
    else:
        auto = routed_row("auto", auto_choice, router=outputs.default_router)
    if outputs.router_importance is not None:
        # DRDF's modal weights (route.modality_weights): what the routers made of each modality, not what decided
        # the answers (their attribution is models/attribution.py's, measured by bench/importance.py).
        auto["modality_weights"] = importance_summary(outputs.router_importance[outputs.default_router], outputs.kinds)
    rows.append(auto)
    rows.append(routed_row("oracle", oracle_routes(correct, path_madds, full_index)))
    calibrated = calibrate(default_scores, outputs.temperatures.get(outputs.default_router, 1.0))
    for threshold in thresholds:
        choice, _ = decide_routes(calibrated, full_index, path_madds=path_madds, thresholds=np.full(n, threshold))
        rows.append(routed_row(f"threshold={threshold:g}", choice, router=outputs.default_router))
    for router in outputs.routers:
        choice, _ = decide_routes(outputs.router_scores[router["name"]], full_index, path_madds=path_madds)
        rows.append(routed_row(f"lambda={router['lambda']:g}", choice, router=router["name"]))
    if outputs.expert_components is not None:
        rows += _multi_expert_rows(outputs, correct, full_index, confidences)
    return rows


def _multi_expert_rows(outputs: RoutingOutputs, correct: np.ndarray, full_index: int, confidences) -> list[dict]:
    """DRDF's soft fusion (every expert runs, weighted by the fused router weights) and the confidence fallback
    (the full path runs too when the routed expert's top probability is below a floor)."""
    experts, n = outputs.experts, len(outputs.labels)
    rows = []
    if outputs.router_weights is not None:
        weights = outputs.router_weights[outputs.default_router]  # (N, E)
        weights = weights / weights.sum(axis=1, keepdims=True)
        mixed = sum(weights[:, i, None] * outputs.expert_probs[e] for i, e in enumerate(experts))  # (N, K)
        madds = np.full(n, float(outputs.madds_of(set(experts))))
        rows.append(_row("soft", outputs, mixed.argmax(axis=1) == outputs.labels, madds, None, mean_weights=dict(
            zip(experts, weights.mean(axis=0).round(4).tolist(), strict=True))))  # fmt: skip
    path_madds = np.array([outputs.path_madds[e] for e in experts], dtype=np.float64)
    choice, _ = decide_routes(outputs.router_scores[outputs.default_router], full_index, path_madds=path_madds)
    for floor in confidences:
        final, madds, fallback = outputs.with_floor(choice, floor)
        row = _row(f"confidence={floor:g}", outputs, correct[np.arange(n), final], madds, final)
        row["fallback_share"] = float(fallback.mean())
        rows.append(row)
    return rows


def _row(policy, outputs: RoutingOutputs, correct, madds, choice, **extra) -> dict:
    """One policy's figures; ``choice`` None: every expert ran (soft fusion), the route mix says so."""
    n = len(correct)
    counts = (
        np.bincount(choice, minlength=len(outputs.experts)) if choice is not None else np.full(len(outputs.experts), n)
    )
    row = {
        "policy": policy,
        "accuracy": float(correct.mean()),
        "madds_per_sample": float(madds.mean()),
        "saved_ratio": float(1.0 - madds.mean() / outputs.madds_full),
        "route_mix": {e: float(c / n) for e, c in zip(outputs.experts, counts, strict=True)},
        **extra,
    }
    if outputs.kinds is not None:
        kinds = np.asarray(outputs.kinds)
        row["accuracy_by_kind"] = {k: float(correct[kinds == k].mean()) for k in sorted(set(outputs.kinds))}
    return row


def importance_summary(importance: np.ndarray, kinds: list[str] | None) -> dict:
    """The image's share's distribution (text = 1 - image): mean and quartiles, overall and per kind."""

    def describe(values: np.ndarray) -> dict:
        q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else (np.nan,) * 3
        return {"mean": float(values.mean()), "q1": float(q1), "median": float(median), "q3": float(q3)}

    image = importance[:, 1]
    summary = {"image": describe(image)}
    if kinds is not None:
        kinds_array = np.asarray(kinds)
        summary["image_by_kind"] = {k: describe(image[kinds_array == k]) for k in sorted(set(kinds))}
    return summary


def find_row(rows: list[dict], policy: str) -> dict:
    for row in rows:
        if row["policy"] == policy:
            return row
    raise KeyError(f"no policy {policy!r} among {[r['policy'] for r in rows]}")


def summarize(rows: list[dict]) -> dict:
    """The headline figures: auto against full and oracle."""
    full, auto, oracle = find_row(rows, "full"), find_row(rows, "auto"), find_row(rows, "oracle")
    return {
        "full_accuracy": full["accuracy"],
        "auto_accuracy": auto["accuracy"],
        # Signed the way a reader says it: positive when auto is above full. The drop (full - auto) stays for
        # the readers of older result files.
        "auto_minus_full_points": 100.0 * (auto["accuracy"] - full["accuracy"]),
        "auto_accuracy_drop_points": 100.0 * (full["accuracy"] - auto["accuracy"]),
        "auto_saved_ratio": auto["saved_ratio"],
        "oracle_saved_ratio": oracle["saved_ratio"],
        "auto_share_of_oracle_savings": auto["saved_ratio"] / oracle["saved_ratio"] if oracle["saved_ratio"] else 0.0,
    }


def compare_points(name: str, accuracy: float, other_name: str, other_accuracy: float) -> str:
    """One accuracy against another in words: "auto is 1.25 points above full (93.75% against 92.50%)"."""
    points = round(100.0 * (accuracy - other_accuracy), 2)
    if points == 0:
        relation = f"level with {other_name}"
    else:
        relation = f"{abs(points):.2f} points {'above' if points > 0 else 'below'} {other_name}"
    return f"{name} is {relation} ({accuracy:.2%} against {other_accuracy:.2%})"


def format_table(rows: list[dict]) -> str:
    experts = list(rows[0]["route_mix"])
    header = f"{'policy':<16} {'accuracy':>8} {'MAdds/sample':>13} {'saved':>7}  " + " ".join(
        f"{e:>11}" for e in experts
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        mix = " ".join(f"{row['route_mix'][e]:>11.1%}" for e in experts)
        figures = f"{row['accuracy']:>8.2%} {row['madds_per_sample']:>13,.0f} {row['saved_ratio']:>7.1%}"
        lines.append(f"{row['policy']:<16} {figures}  {mix}")
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path: Path, title: str = "accuracy against compute") -> None:
    """Accuracy against MAdds per sample: the operating points (one router per lambda), the threshold and
    confidence sweeps of the served router, soft fusion and the static experts.

    Left: everything on a log scale. Right: the routed policies up close, where the curve lives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(row: dict) -> tuple[float, float]:
        return row["madds_per_sample"], 100 * row["accuracy"]

    fig, (overview, zoom) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    sweeps = ("lambda=", "threshold=", "confidence=")
    routed = [r for r in rows if r["policy"].startswith(sweeps) or r["policy"] in ("auto", "oracle")]
    for ax, annotate in ((overview, False), (zoom, True)):
        for prefix, style, label, short in (
            ("lambda=", "o-", "operating points (router per λ)", "λ="),
            ("threshold=", "s--", "threshold sweep (served point)", "t="),
            ("confidence=", "v:", "confidence fallback (served point)", "c="),
        ):
            points = sorted((r for r in rows if r["policy"].startswith(prefix)), key=lambda r: r["madds_per_sample"])
            if points:
                ax.plot(*zip(*(point(r) for r in points), strict=True), style, label=label, alpha=0.8)
            for r in points if annotate else ():
                offset = (4, -10) if prefix == "lambda=" else (4, 6)
                label_text = short + r["policy"].split("=")[1]
                ax.annotate(label_text, point(r), fontsize=7, textcoords="offset points", xytext=offset)
        for r in rows:
            if r["policy"] in ("full", "cheap") or r["policy"].startswith("static:"):
                ax.plot(*point(r), "kD", markersize=7)
                ax.annotate(
                    f"static {r.get('expert', r['policy'])}",
                    point(r),
                    fontsize=8,
                    textcoords="offset points",
                    xytext=(6, 4),
                )
        for policy, marker in (("auto", "r*"), ("oracle", "g^"), ("soft", "mP")):
            if any(r["policy"] == policy for r in rows):
                ax.plot(*point(find_row(rows, policy)), marker, markersize=12, label=policy)
        ax.set_xlabel("MAdds per sample" + ("" if annotate else " (log scale)"))
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    overview.set_xscale("log")
    overview.set_title(title)
    overview.legend(loc="lower right", fontsize=8)
    xs = [r["madds_per_sample"] for r in routed] + [find_row(rows, "full")["madds_per_sample"]]
    ys = [100 * r["accuracy"] for r in routed] + [100 * find_row(rows, "full")["accuracy"]]
    zoom.set_xlim(min(xs) * 0.9, max(xs) * 1.05)
    zoom.set_ylim(min(ys) - 0.5, min(100.0, max(ys)) + 0.3)
    zoom.set_title("routed policies, up close")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
