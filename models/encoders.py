"""Shared encoders: the text encoder, the image glimpse (the router's cheap look at the picture) and the CNN
(the expensive trunk that several image experts read, in two components: ``ImageTrunk`` then ``ImageEncoder``).

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


def token_mask(token_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 for a word, 0 for padding."""
    return (token_ids != PAD_ID).to(torch.float32)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the words of (B, T, D) tokens; an empty text gives zeros."""
    return (tokens * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, D)


class TextEncoder(nn.Module):
    """Token ids -> per-word features and one pooled vector: embedding, 1-D convolutions, masked mean.

    The pooled vector feeds the router and the cheap heads; the per-word features feed the experts in which
    text and image attend to each other (MI2P, MuSE)."""

    input_names = ("token_ids",)
    output_names = ("text_tokens", "text_features")

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

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = token_mask(token_ids)  # (B, T)
        x = self.embedding(token_ids).transpose(1, 2)  # (B, E, T)
        for conv in self.convs:
            x = F.relu(conv(x * mask[:, None, :]))  # (B, D, T); padded positions never leak into neighbours
        tokens = self.norm(x.transpose(1, 2)) * mask[:, :, None]  # (B, T, D), zeros at padding
        pooled = self.norm(masked_mean(x.transpose(1, 2), mask))  # (B, D); empty text -> the norm of zeros
        return tokens, pooled

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        token_ids = torch.randint(2, self.config.vocab_size, (batch_size, self.config.max_tokens))
        lengths = torch.randint(1, self.config.max_tokens + 1, (batch_size, 1))
        return (token_ids * (torch.arange(self.config.max_tokens)[None, :] < lengths),)  # right-padded, as served


def thumbnail(image: torch.Tensor, side: int) -> torch.Tensor:
    """The glimpse's input: the normalized image averaged down to side x side, (B, 3, side, side). Serving
    computes the same from the decoded pixels (ImagePreprocessing.thumbnail), so no request pays for
    normalizing its full-resolution image unless its expert reads it."""
    factor = image.shape[-1] // side
    assert factor * side == image.shape[-1], f"image side {image.shape[-1]} is not a multiple of {side}"
    return F.avg_pool2d(image, factor) if factor > 1 else image


class ImageGlimpse(nn.Module):
    """Two small convolutions over a thumbnail: enough for the router to judge the picture, at ~1% of the encoder."""

    input_names = ("thumbnail",)
    output_names = ("glimpse_features",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        assert config.image_size % config.glimpse_size == 0, (
            f"image_size {config.image_size} must be a multiple of glimpse_size {config.glimpse_size}"
        )
        layers: list[nn.Module] = []
        width_in = 3
        for i, width in enumerate(config.glimpse_channels):
            layers += [nn.Conv2d(width_in, width, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
            width_in = width
        self.convs = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return 2 * self.config.glimpse_channels[-1]

    def forward(self, thumbnail: torch.Tensor) -> torch.Tensor:
        x = self.convs(thumbnail)  # (B, C, g, g)
        # Mean and spread of each channel: the spread is what tells a clean picture from a corrupted one.
        mean = x.mean(dim=(2, 3))
        spread = (x - mean[:, :, None, None]).square().mean(dim=(2, 3)).add(1e-6).sqrt()
        return torch.cat([mean, spread], dim=1)  # (B, 2C)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 3, self.config.glimpse_size, self.config.glimpse_size),)


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


def cnn_levels(config: DynamicFusionConfig) -> nn.ModuleList:
    """The ResNet-style trunk as a list of levels: the stem, then one entry per stage. MI2P injects text between
    levels, so it builds the same trunk and walks it level by level."""
    kernel = config.image_stem_kernel
    stem: list[nn.Module] = [
        nn.Conv2d(3, config.image_stem, kernel, stride=2, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(config.image_stem),
        nn.ReLU(),
    ]
    if config.image_stem_pool:
        stem.append(nn.MaxPool2d(3, stride=2, padding=1))
    levels: list[nn.Module] = [nn.Sequential(*stem)]
    width_in = config.image_stem
    for width, depth, stride in zip(config.image_widths, config.image_blocks, config.image_strides, strict=True):
        blocks = []
        for i in range(depth):
            blocks.append(BasicBlock(width_in, width, stride if i == 0 else 1))
            width_in = width
        levels.append(nn.Sequential(*blocks))
    return nn.ModuleList(levels)


def level_shapes(config: DynamicFusionConfig) -> list[tuple[int, int]]:
    """(channels, side) of the feature map after each level of ``cnn_levels``."""
    side = -(-config.image_size // 2)  # the stem's stride 2 (ceil, as a padded convolution rounds)
    if config.image_stem_pool:
        side = -(-side // 2)
    shapes = [(config.image_stem, side)]
    for width, stride in zip(config.image_widths, config.image_strides, strict=True):
        side = -(-side // stride)
        shapes.append((width, side))
    return shapes


class ImageTrunk(nn.Module):
    """The CNN's first levels (the stem and the stages up to ``config.image_split``), shared by every expert that
    reads the image at full resolution: the image and late-fusion heads and MuSE go on through ``ImageEncoder``,
    MI2P injects text right here and runs its own copy of the later stages."""

    input_names = ("image",)
    output_names = ("image_mid",)

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.levels = cnn_levels(config)[: config.image_split + 1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for level in self.levels:
            x = level(x)
        return x  # (B, C, h, w)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 3, self.config.image_size, self.config.image_size),)


class ImageEncoder(nn.Module):
    """The CNN's later levels, after the trunk; the two together are a ResNet-style CNN (``large``: ResNet-18 at
    224x224). The image and late-fusion heads read its pooled features, MuSE its last feature map as patches."""

    input_names = ("image_mid",)
    output_names = ("image_features", "image_map")

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.levels = cnn_levels(config)[config.image_split + 1 :]

    def forward(self, image_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image_mid
        for level in self.levels:
            x = level(x)  # (B, C, h, w)
        return x.mean(dim=(2, 3)), x  # (B, C), (B, C, h, w)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        channels, side = level_shapes(self.config)[self.config.image_split]
        return (torch.relu(torch.randn(batch_size, channels, side, side)),)
