"""``image_lite``: a cheap look at the picture. A small CNN on a downsampled image, about a tenth of the full
image encoder: enough for one large, clean object, not for a small one among clutter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.experts import ExpertParts, ExpertSpec, as_tuple, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


@dataclass
class ImageLiteConfig:
    downsample: int = 2  # the image is average-pooled by this factor first (64x64 -> 32x32)
    # Four small convolutions, the last three on a 8x8 and 4x4 grid: cheap, yet their receptive field spans a
    # large object (shallower stacks that only saw parts of it confused the shapes).
    channels: tuple[int, ...] = (16, 32, 32, 48)  # conv widths
    strides: tuple[int, ...] = (2, 2, 2, 1)  # one per conv (64x64 -> 32 -> 16 -> 8 -> 4 -> 4)

    def __post_init__(self) -> None:
        self.channels, self.strides = as_tuple(self.channels), as_tuple(self.strides)
        assert len(self.channels) == len(self.strides), f"channels {self.channels} and strides {self.strides} differ"


class LiteImageClassifier(nn.Module):
    input_names = ("image",)
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: ImageLiteConfig):
        super().__init__()
        self.image_size = model.image_size
        self.downsample = nn.AvgPool2d(config.downsample) if config.downsample > 1 else nn.Identity()
        layers: list[nn.Module] = []
        width_in = 3
        for width, stride in zip(config.channels, config.strides, strict=True):
            layers += [nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU())
            width_in = width
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(width_in, model.num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.downsample(image))  # (B, C, h, w)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 3, self.image_size, self.image_size),)


@register_expert("image_lite", ImageLiteConfig)
def image_lite(model: DynamicFusionConfig, config: ImageLiteConfig) -> ExpertParts:
    spec = ExpertSpec("image_lite", modalities=("image",), components=("image_lite",))
    return ExpertParts(spec, {"image_lite": LiteImageClassifier(model, config)})
