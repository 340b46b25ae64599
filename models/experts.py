"""Experts: which modalities and components each path uses, and the classification heads they end in.

An expert is data (``ExpertSpec``), not a module: its components are ordinary named components of
the model, and a component's inputs are found by name among the request's tensors and the outputs
of components already run. That is all the serving pipeline needs to run any expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    modalities: tuple[str, ...]  # what the request must carry for this expert to run
    components: tuple[str, ...]  # this expert's own components, in execution order; the last outputs "logits"

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        assert not unknown, f"expert {self.name}: unknown modalities {sorted(unknown)}"

    def to_dict(self) -> dict:
        return {"name": self.name, "modalities": list(self.modalities), "components": list(self.components)}


class TextHead(nn.Module):
    """The cheap expert: classify from the shared text features alone."""

    input_names = ("text_features",)
    output_names = ("logits",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.text_dim, config.text_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.text_dim, config.num_classes),
        )

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(text_features)  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.config.text_dim),)


class ImageHead(nn.Module):
    """The image-only expert's classifier on top of the CNN features (used when the text is missing)."""

    input_names = ("image_features",)
    output_names = ("logits",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.image_widths[-1], config.num_classes)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.config.image_widths[-1]),)


class FusionHead(nn.Module):
    """Late fusion (DynMM's E2): concatenated text and image features through a small MLP."""

    input_names = ("text_features", "image_features")
    output_names = ("logits",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.text_dim + config.image_widths[-1], config.fusion_hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.fusion_hidden, config.num_classes),
        )

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([text_features, image_features], dim=1))  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.config.text_dim), torch.randn(batch_size, self.config.image_widths[-1]))
