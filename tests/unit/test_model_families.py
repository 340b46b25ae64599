"""Every registered model: shapes, no NaN, and TorchScript and ONNX round trips of every component."""

from __future__ import annotations

import pytest
import torch

from export.onnx import OnnxComponent, export_onnx
from export.parity import TOLERANCE, max_abs_difference
from export.torchscript import TorchScriptComponent, export_torchscript
from models.registry import create_model, list_models

# Small inputs keep ResNet-18 (the large preset) quick; its structure is unchanged.
SMALL = {"dynamic_fusion_large": {"image_size": 64, "glimpse_size": 16}}


def test_the_registry_lists_the_presets():
    assert {"dynamic_fusion_tiny", "dynamic_fusion_default", "dynamic_fusion_large"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope")
    with pytest.raises(TypeError, match="unknown config fields"):
        create_model("dynamic_fusion_tiny", colour=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_components_round_trip_through_both_formats(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **SMALL.get(name, {})).eval()
    assert model.config == type(model.config)(**model.config.to_dict())  # rebuildable from its config
    for component_name, module in model.components.items():
        inputs = [module.example_inputs(b) for b in (1, 5)]
        with torch.no_grad():
            outputs = module(*inputs[1])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert all(o.shape[0] == 5 and torch.isfinite(o).all() for o in outputs), component_name
        export_onnx(module, tmp_path / f"{component_name}.onnx")
        export_torchscript(module, tmp_path / f"{component_name}.pt")
        assert max_abs_difference(module, OnnxComponent(tmp_path / f"{component_name}.onnx"), inputs) <= TOLERANCE
        assert max_abs_difference(module, TorchScriptComponent(tmp_path / f"{component_name}.pt"), inputs) <= TOLERANCE
    logits = model.expert_logits(*model.text_encoder.example_inputs(3), *model.image_encoder.example_inputs(3))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        e.name: (3, model.config.num_classes) for e in model.experts
    }
