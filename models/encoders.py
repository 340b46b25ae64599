"""Encoders: the text encoder, the image glimpse (the router's cheap look at the picture) and the CNN image encoder.

Every component module declares ``input_names`` / ``output_names`` and can make ``example_inputs``;
export and cost counting need nothing else to handle it on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.tokenizer import PAD_ID

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


class TextEncoder(nn.Module):
    """Token ids -> one feature vector: embedding, 1-D convolutions, masked mean pooling."""

    input_names = ("token_ids",)
    output_names = ("text_features",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.text_embed_dim, padding_idx=PAD_ID)
        widths = [config.text_embed_dim] + [config.text_dim] * config.text_layers
        self.convs = nn.ModuleList(
            nn.Conv1d(w_in, w_out, kernel_size=3, padding=1)
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.norm = nn.LayerNorm(config.text_dim)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        mask = (token_ids != PAD_ID).unsqueeze(1).to(torch.float32)  # (B, 1, T)
        x = self.embedding(token_ids).transpose(1, 2)  # (B, E, T)
        for conv in self.convs:
            x = F.relu(conv(x * mask))  # (B, D, T); padded positions never leak into neighbours
        pooled = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B, D); empty text -> zeros before the norm
        return self.norm(pooled)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, self.config.vocab_size, (batch_size, self.config.max_tokens)),)


class ImageGlimpse(nn.Module):
    """A thumbnail and two small convolutions: enough for the router to judge the picture, at ~1% of the encoder."""

    input_names = ("image",)
    output_names = ("glimpse_features",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        factor = config.image_size // config.glimpse_size
        assert factor * config.glimpse_size == config.image_size, (
            f"image_size {config.image_size} must be a multiple of glimpse_size {config.glimpse_size}"
        )
        self.thumbnail = nn.AvgPool2d(factor) if factor > 1 else nn.Identity()
        layers: list[nn.Module] = []
        width_in = 3
        for i, width in enumerate(config.glimpse_channels):
            layers += [nn.Conv2d(width_in, width, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
            width_in = width
        self.convs = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return 2 * self.config.glimpse_channels[-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.thumbnail(image))  # (B, C, g, g)
        # Mean and spread of each channel: the spread is what tells a clean picture from a corrupted one.
        mean = x.mean(dim=(2, 3))
        spread = (x - mean[:, :, None, None]).square().mean(dim=(2, 3)).add(1e-6).sqrt()
        return torch.cat([mean, spread], dim=1)  # (B, 2C)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 3, self.config.image_size, self.config.image_size),)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block."""

    def __init__(self, width_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ImageEncoder(nn.Module):
    """A ResNet-style CNN; the ``large`` preset is ResNet-18 at 224x224. The expensive part of the full path."""

    input_names = ("image",)
    output_names = ("image_features",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        kernel = config.image_stem_kernel
        stem: list[nn.Module] = [
            nn.Conv2d(3, config.image_stem, kernel, stride=2, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(config.image_stem),
            nn.ReLU(),
        ]
        if config.image_stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        width_in = config.image_stem
        for width, depth, stride in zip(config.image_widths, config.image_blocks, config.image_strides, strict=True):
            for i in range(depth):
                blocks.append(BasicBlock(width_in, width, stride if i == 0 else 1))
                width_in = width
        self.blocks = nn.Sequential(*blocks)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(image))  # (B, C, h, w)
        return x.mean(dim=(2, 3))  # (B, C)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 3, self.config.image_size, self.config.image_size),)
