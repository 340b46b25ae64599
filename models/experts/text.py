"""``text``: the cheapest rung. Classify from the shared text features alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.experts import ExpertParts, ExpertSpec, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


@dataclass
class TextExpertConfig:
    hidden: int | None = None  # MLP width; None: the text feature width
    dropout: float = 0.1  # while training


class TextHead(nn.Module):
    input_names = ("text_features",)
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: TextExpertConfig):
        super().__init__()
        self.text_dim = model.text_dim
        hidden = config.hidden or model.text_dim
        self.mlp = nn.Sequential(
            nn.Linear(model.text_dim, hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, model.num_classes),
        )

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(text_features)  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.text_dim),)


@register_expert("text", TextExpertConfig)
def text(model: DynamicFusionConfig, config: TextExpertConfig) -> ExpertParts:
    spec = ExpertSpec("text", modalities=("text",), components=("text_head",))
    return ExpertParts(spec, {"text_head": TextHead(model, config)})
