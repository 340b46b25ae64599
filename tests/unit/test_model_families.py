"""Every registered model: shapes, no NaN, and TorchScript and ONNX round trips of every component."""

from __future__ import annotations

import json

import pytest
import torch

from export.onnx import OnnxComponent, export_onnx
from export.parity import TOLERANCE, max_abs_difference
from export.torchscript import TorchScriptComponent, export_torchscript
from models.costs import routing_costs
from models.experts import list_experts
from models.registry import create_model, list_models

# Small inputs keep ResNet-18 (the large preset) quick; its structure is unchanged.
SMALL = {"dynamic_fusion_large": {"image_size": 64, "glimpse_size": 16}}


def test_the_registry_lists_the_presets_and_the_expert_families():
    assert {"dynamic_fusion_tiny", "dynamic_fusion_default", "dynamic_fusion_large"} <= set(list_models())
    assert set(list_experts()) >= {"text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse"}
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope")
    with pytest.raises(TypeError, match="unknown config fields"):
        create_model("dynamic_fusion_tiny", colour=3)
    with pytest.raises(TypeError, match=r"unknown config fields \['layerz'\] for the 'muse' expert family"):
        create_model("dynamic_fusion_tiny", expert_configs={"muse": {"layerz": 3}})


def test_each_family_builds_from_its_own_config_and_the_ladder_is_ordered_by_cost():
    model = create_model("dynamic_fusion_default")
    assert [e.name for e in model.experts] == ["text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse"]
    assert model.config.expert_configs["muse"]["exchange_ratio"] == 0.1  # resolved in full, defaults included
    costs = routing_costs(model, "mi2p")["path"]
    ladder = [costs[e.name] for e in model.experts]
    assert ladder == sorted(ladder), costs
    assert costs["image_lite"] < 0.2 * costs["image"]  # the cheap look is a fraction of the full encoder
    only_two = create_model("dynamic_fusion_tiny", experts=("text", "image_lite"))
    assert set(only_two.components) == {"text_encoder", "image_glimpse", "router", "text_head", "image_lite"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list_models())
def test_components_round_trip_through_both_formats(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **SMALL.get(name, {})).eval()
    assert model.config == type(model.config)(**model.config.to_dict())  # rebuildable from its config
    # ResNet-18 (large) runs the same code as the default preset with more stages: TorchScript and shapes suffice
    # there, and its ONNX exports would add minutes to every CI run.
    formats = [("torchscript", export_torchscript, TorchScriptComponent, ".pt")]
    if name != "dynamic_fusion_large":
        formats.append(("onnx", export_onnx, OnnxComponent, ".onnx"))
    if name == "dynamic_fusion_tiny":  # the session exports the tiny preset anyway: the next test reads that
        formats = []
    for component_name, module in model.components.items():
        inputs = [module.example_inputs(b) for b in (1, 5)]
        with torch.no_grad():
            outputs = module(*inputs[1])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert all(o.shape[0] == 5 and torch.isfinite(o).all() for o in outputs), component_name
        for fmt, export, load, suffix in formats:
            path = tmp_path / f"{component_name}{suffix}"
            export(module, path)
            assert max_abs_difference(module, load(path), inputs) <= TOLERANCE, (component_name, fmt)
    logits = model.expert_logits(*model.text_encoder.example_inputs(3), *model.image_trunk.example_inputs(3))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        e.name: (3, model.config.num_classes) for e in model.experts
    }


@pytest.mark.slow
def test_the_tiny_presets_components_round_trip_in_the_sessions_export(tiny_export):
    """``dynfuse export`` of the tiny run (conftest's tiny_export) checked every component in both formats against
    eager PyTorch, on random inputs of batch 1, 3 and 16 and on real ones; its model.json records each difference."""
    manifest = json.loads((tiny_export / "shapes" / "1" / "model.json").read_text())
    components = set(create_model("dynamic_fusion_tiny").components) - {"router"}
    # and the attribution heads distilled for the experts whose exact values cost more than the budget
    heads = {e["head"] for e in manifest["attribution"]["experts"].values() if e.get("head")}
    assert heads
    assert all(head.startswith("attribution.") for head in heads)
    components |= heads
    assert {name for name in manifest["components"] if not name.startswith("router.")} == components
    parity = manifest["parity"]["components"]
    assert set(parity) == set(manifest["components"])
    for name, formats in parity.items():
        assert set(formats) == {"onnx", "torchscript"}, name
        assert max(formats.values()) <= TOLERANCE, (name, formats)
