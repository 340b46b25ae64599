"""``dynfuse plan``: replicas from the route mix and one replica's measured throughput, within a latency bound,
against a static full model, and a Serve config that Ray's schema accepts."""

from __future__ import annotations

import json

import pytest
import yaml

from service import plan
from service.cli import main

# One replica's measured throughput (bench/expert_throughput.py's format): the cheap expert is 100x the full one.
THROUGHPUT = {
    "model": "shapes",
    "version": "1",
    "full_expert": "heavy",
    "ingress": {"1": {"batch_ms": 0.5, "rows_per_s": 2000.0}, "16": {"batch_ms": 2.0, "rows_per_s": 8000.0}},
    "experts": {
        "cheap": {"1": {"batch_ms": 0.1, "rows_per_s": 10000.0}, "16": {"batch_ms": 0.16, "rows_per_s": 100000.0}},
        "heavy": {"1": {"batch_ms": 10.0, "rows_per_s": 100.0}, "16": {"batch_ms": 80.0, "rows_per_s": 200.0}},
    },
    "static_full": {"1": {"batch_ms": 10.5, "rows_per_s": 95.0}, "16": {"batch_ms": 84.0, "rows_per_s": 190.0}},
}
MIX = {"cheap": 0.8, "heavy": 0.2}


def by_name(lines):
    return {line.deployment: line for line in lines}


def test_each_deployment_gets_the_replicas_its_share_of_the_traffic_needs():
    lines, static = plan.make_plan(1000, MIX, THROUGHPUT, p99_ms=None, utilization=0.5)
    lines = by_name(lines)
    assert lines["expert_heavy"].rate == pytest.approx(200)
    assert (lines["expert_heavy"].batch_size, lines["expert_heavy"].replicas) == (16, 2)  # 200 / (200 * 0.5)
    assert lines["expert_cheap"].replicas == 1
    assert lines["ingress"].replicas == 1
    assert (static.batch_size, static.replicas) == (16, 11)  # 1000 / (190 * 0.5) = 10.5


def test_a_latency_bound_keeps_each_batch_within_half_of_it():
    lines, static = plan.make_plan(1000, MIX, THROUGHPUT, p99_ms=50, utilization=0.5)
    heavy = by_name(lines)["expert_heavy"]
    assert (heavy.batch_size, heavy.replicas) == (1, 4)  # the 80 ms batch of 16 is over 25 ms
    assert (static.batch_size, static.replicas) == (1, 22)
    with pytest.raises(plan.PlanError, match="raise --p99-ms"):
        plan.make_plan(1000, MIX, THROUGHPUT, p99_ms=10, utilization=0.5)


def test_an_expert_without_a_measurement_is_named():
    with pytest.raises(plan.PlanError, match=r"no throughput measured for expert 'other' in the throughput file"):
        plan.make_plan(10, {"cheap": 0.5, "other": 0.5}, THROUGHPUT, None, 0.7)
    # An expert of the model the route mix never takes still needs a replica, and so a measurement.
    with pytest.raises(plan.PlanError, match=r"expert 'idle'.*bench.expert_throughput"):
        plan.make_plan(10, MIX, THROUGHPUT, None, 0.7, experts=["cheap", "heavy", "idle"])
    assert plan.parse_mix("cheap=3,heavy=1") == {"cheap": 0.75, "heavy": 0.25}


def test_every_expert_of_the_model_gets_a_line_even_one_the_mix_never_takes():
    lines, _ = plan.make_plan(100, {"cheap": 1.0}, THROUGHPUT, None, 0.7, experts=["cheap", "heavy"])
    heavy = by_name(lines)["expert_heavy"]
    assert (heavy.share, heavy.rate, heavy.replicas) == (0.0, 0.0, 1)


def test_the_command_on_a_stored_model_names_the_expert_the_throughput_file_lacks(tiny_store, tmp_path, capsys):
    """The model's experts come from its model.json; a throughput file measured before an expert joined the
    ladder (the default model's mulmix once) is refused naming it, and nothing is written."""
    measured = {**THROUGHPUT, "experts": {"text": THROUGHPUT["experts"]["cheap"]}}
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps(measured))
    code = main(["plan", "--rps", "100", "--store", str(tiny_store), "--throughput", str(throughput)])
    assert code == 1
    error = capsys.readouterr().err
    assert "no throughput measured for expert 'image_lite', 'image', 'late_fusion', 'mulmix', 'mi2p', 'muse'" in error
    assert str(throughput) in error


def test_the_command_writes_nothing_unless_asked(tiny_store, tmp_path, capsys, monkeypatch):
    table = THROUGHPUT["experts"]["cheap"]
    experts = ["text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse"]
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps({**THROUGHPUT, "experts": dict.fromkeys(experts, table)}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["plan", "--rps", "100", "--store", str(tiny_store), "--throughput", str(throughput)]) == 0
    assert list(work.rglob("*")) == []
    assert "expert_mulmix" in capsys.readouterr().out


def test_the_command_prints_the_plan_and_writes_a_serve_config_rays_schema_accepts(tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    from service.ray.options import AppArgs

    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps(THROUGHPUT))
    out = tmp_path / "serve.yaml"
    code = main(
        ["plan", "--rps", "1000", "--mix", "cheap=0.8,heavy=0.2", "--throughput", str(throughput), "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "expert_heavy" in printed
    assert "static full (heavy)" in printed
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.experts["heavy"].num_replicas == 2  # 200 / (200 * 0.7)
    assert out.read_text().startswith("# Written by: dynfuse plan --rps 1000")
