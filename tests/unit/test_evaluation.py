"""The policy table on hand-made outputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import RoutingOutputs, evaluate_policies, find_row, format_table, plot_pareto, summarize


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
