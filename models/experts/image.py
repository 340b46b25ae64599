"""``image``: the full image encoder and a small MLP classifier: the image-only path for pictures that need a
careful look (a small object among clutter), and for requests without text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.experts import ExpertParts, ExpertSpec, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


@dataclass
class ImageExpertConfig:
    hidden: int = 128  # MLP width: as late fusion's, so the two differ only in reading the text
    dropout: float = 0.1  # while training


class ImageHead(nn.Module):
    input_names = ("image_features",)
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: ImageExpertConfig):
        super().__init__()
        self.features = model.image_widths[-1]
        self.mlp = nn.Sequential(
            nn.Linear(self.features, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, model.num_classes),
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(image_features)  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.features),)


@register_expert("image", ImageExpertConfig)
def image(model: DynamicFusionConfig, config: ImageExpertConfig) -> ExpertParts:
    spec = ExpertSpec("image", modalities=("image",), components=("image_trunk", "image_encoder", "image_head"))
    return ExpertParts(spec, {"image_head": ImageHead(model, config)})
