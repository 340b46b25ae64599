"""The policy table on hand-made outputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import (
    RoutingOutputs,
    compare_points,
    evaluate_policies,
    find_row,
    format_table,
    plot_pareto,
    summarize,
)


def one_hot_probs(predictions, k=3):
    return np.eye(k)[predictions]


@pytest.fixture
def outputs() -> RoutingOutputs:
    labels = np.array([0, 1, 2, 0])
    return RoutingOutputs(
        labels=labels,
        expert_probs={
            "text": one_hot_probs([0, 0, 2, 1]),  # right on 0 and 2
            "image": one_hot_probs([1, 1, 1, 1]),  # right on 1
            "late_fusion": one_hot_probs([0, 1, 2, 0]),  # always right
        },
        router_scores={"r": np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]])},
        routers=[{"name": "r", "lambda": 0.1}],
        default_router="r",
        experts=["text", "image", "late_fusion"],
        path_madds={"text": 10, "image": 90, "late_fusion": 101},
        static_madds={"text": 8, "image": 88, "late_fusion": 100},
        madds_full=100,
        full_expert="late_fusion",
    )


def test_static_policies_use_static_costs(outputs):
    rows = evaluate_policies(outputs, thresholds=(0.7,))
    full, cheap = find_row(rows, "full"), find_row(rows, "cheap")
    assert (full["accuracy"], full["madds_per_sample"], full["saved_ratio"]) == (1.0, 100.0, 0.0)
    assert (cheap["accuracy"], cheap["madds_per_sample"]) == (0.5, 8.0)
    assert cheap["route_mix"] == {"text": 1.0, "image": 0.0, "late_fusion": 0.0}


def test_auto_follows_the_router_and_pays_the_routed_path(outputs):
    auto = find_row(evaluate_policies(outputs, thresholds=()), "auto")
    # choices: text, full, text, full -> right, right, right, right
    assert auto["accuracy"] == 1.0
    assert auto["madds_per_sample"] == pytest.approx((10 + 101 + 10 + 101) / 4)
    assert auto["saved_ratio"] == pytest.approx(1 - auto["madds_per_sample"] / 100)
    assert auto["route_mix"] == {"text": 0.5, "image": 0.0, "late_fusion": 0.5}


def test_the_threshold_escalates_and_the_oracle_is_cheapest(outputs):
    rows = evaluate_policies(outputs, thresholds=(0.7,))
    assert find_row(rows, "threshold=0.7")["route_mix"] == {"text": 0.25, "image": 0.0, "late_fusion": 0.75}
    oracle = find_row(rows, "oracle")  # text, image, text, full
    assert oracle["madds_per_sample"] == pytest.approx((10 + 90 + 10 + 101) / 4)
    assert find_row(rows, "lambda=0.1")["accuracy"] == 1.0


def test_summary_table_and_plot(outputs, tmp_path):
    rows = evaluate_policies(outputs)
    summary = summarize(rows)
    assert summary["auto_accuracy_drop_points"] == 0.0
    assert summary["auto_share_of_oracle_savings"] == pytest.approx(
        summary["auto_saved_ratio"] / summary["oracle_saved_ratio"]
    )
    assert "oracle" in format_table(rows)
    plot_pareto(rows, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soft_fusion_mixes_every_expert_and_pays_each_component_once(outputs):
    outputs.router_weights = {"r": np.array([[0.9, 0.9, 0.1], [0.1, 0.1, 0.9], [0.2, 0.7, 0.7], [0.9, 0.1, 0.2]])}
    outputs.shared_madds = 2
    outputs.component_madds = {"text_head": 8, "cnn": 80, "image_head": 0, "fusion_head": 11}
    outputs.expert_components = {
        "text": ("text_head",),
        "image": ("cnn", "image_head"),
        "late_fusion": ("cnn", "fusion_head"),
    }
    soft = find_row(evaluate_policies(outputs, thresholds=(), confidences=()), "soft")
    assert soft["madds_per_sample"] == 2 + 8 + 80 + 0 + 11  # the shared CNN once, not once per expert
    assert soft["route_mix"] == {"text": 1.0, "image": 1.0, "late_fusion": 1.0}
    # sample 0: text and image tie at 0.9, their one-hot answers 0 and 1 mix; the first (0) wins the argmax
    assert soft["accuracy"] == 0.75  # sample 2: 0.2*text(2) + 0.7*image(1) + 0.7*late(2) -> 2, right; sample 3 wrong


def test_the_confidence_fallback_escalates_unsure_answers_and_pays_both_paths(outputs):
    outputs.expert_probs["text"] = np.array([[0.6, 0.2, 0.2], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    outputs.shared_madds = 2
    outputs.component_madds = {"text_head": 8, "cnn": 80, "image_head": 0, "fusion_head": 11}
    outputs.expert_components = {
        "text": ("text_head",),
        "image": ("cnn", "image_head"),
        "late_fusion": ("cnn", "fusion_head"),
    }
    row = find_row(evaluate_policies(outputs, thresholds=(), confidences=(0.7,)), "confidence=0.7")
    # auto picks text, full, text, full; both text answers are below 0.7, so both run the full path too
    assert row["fallback_share"] == 0.5
    assert row["route_mix"] == {"text": 0.0, "image": 0.0, "late_fusion": 1.0}
    assert row["madds_per_sample"] == pytest.approx((2 + 8 + 80 + 11) * 2 / 4 + 101 * 2 / 4)


def test_the_threshold_does_not_escalate_from_an_expert_dearer_than_the_full_path(outputs):
    """Evaluation applies the server's rule (models/policy.py): escalation only from a path cheaper by MAdds."""
    outputs.path_madds = {"text": 10, "image": 150, "late_fusion": 101}  # image costs more than the full path
    outputs.router_scores["r"] = np.array([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]])
    row = find_row(evaluate_policies(outputs, thresholds=(0.95,), confidences=()), "threshold=0.95")
    # picks text, image, text, full: both text picks escalate; the image pick stays where the router put it
    assert row["route_mix"] == {"text": 0.0, "image": 0.25, "late_fusion": 0.75}
    assert row["madds_per_sample"] == pytest.approx((101 + 150 + 101 + 101) / 4)


def test_a_difference_reads_with_the_sign_a_reader_expects():
    assert compare_points("auto", 0.9375, "full", 0.925) == "auto is 1.25 points above full (93.75% against 92.50%)"
    assert compare_points("auto", 0.799, "full", 0.851) == "auto is 5.20 points below full (79.90% against 85.10%)"
    assert compare_points("auto", 0.5, "full", 0.5) == "auto is level with full (50.00% against 50.00%)"
    rows = [
        {"policy": "full", "accuracy": 0.8, "saved_ratio": 0.0},
        {"policy": "auto", "accuracy": 0.85, "saved_ratio": 0.5},
        {"policy": "oracle", "accuracy": 0.9, "saved_ratio": 0.6},
    ]
    assert summarize(rows)["auto_minus_full_points"] == pytest.approx(5.0)
