"""Expert families: the rungs of the cost ladder the router chooses among, one file each.

An expert is data (``ExpertSpec``): the modalities a request must carry for it to run, and the chain of
components it runs, in order, the last one outputting ``logits``. A component's inputs are found by name
among the request's tensors (``token_ids``, ``image``), the shared encoders' outputs (``text_tokens``,
``text_features``) and the outputs of components earlier in the chain. That is all the serving pipeline
needs to run any expert.

A family is registered with ``@register_expert(name, ConfigClass)``: a function that builds, from the model's
config and the family's own dataclass config, the components the family owns (``ExpertParts``). A chain may
also name the model's shared image trunk, ``image_encoder``, which several experts read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig

MODALITIES = ("text", "image")
# The family modules, imported on first use so that their @register_expert decorators run.
FAMILY_MODULES = ("text", "image_lite", "image", "late_fusion", "mi2p", "muse", "mulmix")


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    modalities: tuple[str, ...]  # what the request must carry for this expert to run
    components: tuple[str, ...]  # the chain it runs, in order; the last outputs "logits"

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        assert not unknown, f"expert {self.name}: unknown modalities {sorted(unknown)}"

    def to_dict(self) -> dict:
        return {"name": self.name, "modalities": list(self.modalities), "components": list(self.components)}


# An auxiliary training loss: the batch's tensors (inputs and every component's outputs) -> a scalar added to
# Stage I's loss.
AuxiliaryLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# An expert's own Stage I loss, in place of the cross-entropy of its logits: (tensors, labels) -> a scalar.
ExpertLoss = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class ExpertParts:
    spec: ExpertSpec
    components: dict[str, nn.Module]  # exported and served: the components this family owns
    training_modules: dict[str, nn.Module] = field(default_factory=dict)  # trained in Stage I, never exported
    auxiliary_loss: AuxiliaryLoss | None = None
    loss: ExpertLoss | None = None  # None: cross-entropy of the expert's logits


Builder = Callable[["DynamicFusionConfig", Any], ExpertParts]
_FAMILIES: dict[str, tuple[type, Builder]] = {}


def register_expert(name: str, config_class: type) -> Callable[[Builder], Builder]:
    def decorator(build: Builder) -> Builder:
        assert name not in _FAMILIES, f"expert family {name!r} registered twice"
        _FAMILIES[name] = (config_class, build)
        return build

    return decorator


def list_experts() -> list[str]:
    _load_families()
    return sorted(_FAMILIES)


def family_config(name: str, overrides: dict | None = None):
    """The family's dataclass config with ``overrides`` applied; unknown fields are refused by name."""
    _load_families()
    if name not in _FAMILIES:
        raise KeyError(f"unknown expert family {name!r}; registered: {', '.join(sorted(_FAMILIES))}")
    config_class = _FAMILIES[name][0]
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in fields(config_class)}
    if unknown:
        raise TypeError(f"unknown config fields {sorted(unknown)} for the {name!r} expert family")
    return config_class(**overrides)


def build_expert(name: str, model_config: DynamicFusionConfig, overrides: dict | None = None) -> ExpertParts:
    parts = _FAMILIES[name][1](model_config, family_config(name, overrides))
    assert parts.spec.name == name, f"family {name!r} built an expert named {parts.spec.name!r}"
    return parts


def _load_families() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(f"models.experts.{module}")


def as_tuple(value):
    """JSON round trips turn tuples into lists; configs keep tuples so they compare equal."""
    return tuple(value) if isinstance(value, list) else value
