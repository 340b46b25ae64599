"""``late_fusion``: DynMM's E2. The pooled text features and the pooled image features, concatenated, through
a small MLP. Each modality is summarized on its own before they meet, so where things are is lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.experts import ExpertParts, ExpertSpec, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


@dataclass
class LateFusionConfig:
    hidden: int = 128  # MLP width
    dropout: float = 0.1  # while training


class FusionHead(nn.Module):
    input_names = ("text_features", "image_features")
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: LateFusionConfig):
        super().__init__()
        self.text_dim, self.image_dim = model.text_dim, model.image_widths[-1]
        self.mlp = nn.Sequential(
            nn.Linear(self.text_dim + self.image_dim, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, model.num_classes),
        )

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([text_features, image_features], dim=1))  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.text_dim), torch.randn(batch_size, self.image_dim))


@register_expert("late_fusion", LateFusionConfig)
def late_fusion(model: DynamicFusionConfig, config: LateFusionConfig) -> ExpertParts:
    spec = ExpertSpec(
        "late_fusion", modalities=("text", "image"), components=("image_trunk", "image_encoder", "fusion_head")
    )
    return ExpertParts(spec, {"fusion_head": FusionHead(model, config)})
