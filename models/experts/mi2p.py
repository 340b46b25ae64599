"""``mi2p``: the Multimodal Information Injection Plug-in (PAPERS.md section 4), both ways.

Text into the image CNN: after the shared trunk, and after chosen levels of MI2P's own copy of the later
CNN stages, every channel queries the words (a per-channel convolution, average-pooled, gives the query);
each word's value is a spatial map, so a word such as "left" can add a map that favours one half of the
picture to the channels that ask for it: Z <- Z + softmax(Q K^T / sqrt(d_k)) V, reshaped to the channel's map.

Image into the text: a small text stack over the shared encoder's word features, where every word queries
the channels of the CNN's last map (keys from a per-channel convolution, values from the flattened map):
T <- T + softmax(Q K^T / sqrt(d_k)) V.

The two expanded branches are pooled (image: mean; text: masked mean) and concatenated into a classifier.
The value projections start at zero, so each plug-in starts as the identity and the trunk as a plain CNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import cnn_levels, level_shapes, masked_mean, token_mask
from models.experts import ExpertParts, ExpertSpec, as_tuple, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig

# Added to the attention logits of padded words: finite, so a text of padding only gives a uniform (harmless)
# attention instead of NaN.
MASKED = -1e9


@dataclass
class Mi2pConfig:
    inject_at: tuple[int, ...] = (1,)  # CNN levels after which text is injected (0: the stem, k: stage k); from
    # the model's image_split on: the levels before are the shared trunk
    heads: int = 2  # attention heads of each plug-in
    key_dim: int = 4  # per head: query and key width (the paper's d_q = d_k)
    text_layers: int = 1  # text blocks, each with an image-into-text plug-in before it
    hidden: int = 128  # classifier width
    dropout: float = 0.1  # in the classifier, while training

    def __post_init__(self) -> None:
        self.inject_at = as_tuple(self.inject_at)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


class ChannelQueries(nn.Module):
    """MI2P's per-channel descriptor: ``width`` kernels on each channel of a map, average-pooled -> (B, C, width).

    The map is first average-pooled to a small grid (``grid`` x ``grid``): the descriptor is pooled anyway, and a
    grouped convolution at full resolution was most of the plug-in's cost (its backward pass is slow on CPUs).
    A ReLU sits between the convolution and the pooling: the mean of a linear convolution is just the channel's
    mean times a constant vector, which would make every channel's query the same up to scale."""

    def __init__(self, channels: int, width: int, grid: int = 4):
        super().__init__()
        self.width, self.grid = width, grid
        self.conv = nn.Conv2d(channels, channels * width, 3, padding=1, groups=channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        coarse = F.adaptive_avg_pool2d(feature_map, self.grid)  # (B, C, g, g)
        pooled = F.relu(self.conv(coarse)).mean(dim=(2, 3))  # (B, C*width), grouped: channel c's kernels first
        return pooled.reshape(feature_map.shape[0], -1, self.width)  # (B, C, width)


class TextIntoImage(nn.Module):
    """Channels attend over words; each word's value is a map of the channel's size, added to the channel."""

    def __init__(self, channels: int, side: int, text_dim: int, heads: int, key_dim: int):
        super().__init__()
        assert side * side % heads == 0, f"a {side}x{side} map does not split into {heads} heads"
        self.heads, self.key_dim, self.side = heads, key_dim, side
        self.query = ChannelQueries(channels, heads * key_dim)
        self.key = nn.Linear(text_dim, heads * key_dim)
        self.value = nn.Linear(text_dim, side * side)  # h * d_v = h^k * w^k, as the paper requires
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, feature_map: torch.Tensor, words: torch.Tensor, word_bias: torch.Tensor) -> torch.Tensor:
        batch, channels = feature_map.shape[:2]
        q = _heads(self.query(feature_map), self.heads)  # (B, H, C, d_k)
        k = _heads(self.key(words), self.heads)  # (B, H, T, d_k)
        v = _heads(self.value(words), self.heads)  # (B, H, T, side*side/H)
        attention = F.softmax(q @ k.transpose(2, 3) / math.sqrt(self.key_dim) + word_bias[:, None, None, :], dim=-1)
        delta = (attention @ v).transpose(1, 2).reshape(batch, channels, self.side, self.side)  # (B, C, side, side)
        return feature_map + delta


class ImageIntoText(nn.Module):
    """Words attend over channels; each channel's value is its flattened map, projected to the word width."""

    def __init__(self, text_dim: int, channels: int, side: int, heads: int, key_dim: int):
        super().__init__()
        assert text_dim % heads == 0, f"text width {text_dim} does not split into {heads} heads"
        self.heads, self.key_dim = heads, key_dim
        self.query = nn.Linear(text_dim, heads * key_dim)
        self.key = ChannelQueries(channels, heads * key_dim)
        self.value = nn.Linear(side * side, text_dim)  # W_V in R^{h'w' x d_v}, h * d_v = d
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, words: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        batch, length, width = words.shape
        q = _heads(self.query(words), self.heads)  # (B, H, T, d_k)
        k = _heads(self.key(feature_map), self.heads)  # (B, H, C, d_k)
        v = _heads(self.value(feature_map.flatten(2)), self.heads)  # (B, H, C, D/H)
        attention = F.softmax(q @ k.transpose(2, 3) / math.sqrt(self.key_dim), dim=-1)  # (B, H, T, C)
        return words + (attention @ v).transpose(1, 2).reshape(batch, length, width)


class TextBlock(nn.Module):
    """A masked 1-D convolution over the words with a residual, the text branch's unit."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        update = F.relu(self.conv((words * mask[:, :, None]).transpose(1, 2))).transpose(1, 2)  # (B, T, D)
        return self.norm(words + update) * mask[:, :, None]


class Mi2pExpert(nn.Module):
    """The shared trunk's map in, with text injected into it and into each of MI2P's own copies of the later CNN
    stages at the levels ``inject_at`` names; then the words take in the last map; both pooled and classified."""

    input_names = ("image_mid", "text_tokens", "token_ids")
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: Mi2pConfig):
        super().__init__()
        self.model_config = model
        shapes = level_shapes(model)
        assert all(model.image_split <= level < len(shapes) for level in config.inject_at), (
            f"inject_at {config.inject_at}: text can be injected after levels {model.image_split}..{len(shapes) - 1} "
            f"(the levels up to image_split={model.image_split} are the shared trunk)"
        )
        self.first_level = model.image_split + 1
        # Its own copy of the stages after the trunk: injected features must not leak into the image experts.
        self.levels = cnn_levels(model)[self.first_level :]
        self.inject_at = tuple(sorted(set(config.inject_at)))
        self.into_image = nn.ModuleDict(
            {
                str(level): TextIntoImage(*shapes[level], model.text_dim, config.heads, config.key_dim)
                for level in self.inject_at
            }
        )
        channels, side = shapes[-1]
        self.into_text = nn.ModuleList(
            ImageIntoText(model.text_dim, channels, side, config.heads, config.key_dim)
            for _ in range(config.text_layers)
        )
        self.text_blocks = nn.ModuleList(TextBlock(model.text_dim) for _ in range(config.text_layers))
        self.classifier = nn.Sequential(
            nn.Linear(channels + model.text_dim, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, model.num_classes),
        )

    def forward(self, image_mid: torch.Tensor, text_tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        mask = token_mask(token_ids)  # (B, T)
        word_bias = (1.0 - mask) * MASKED
        x = self._inject(image_mid, self.first_level - 1, text_tokens, word_bias)  # (B, C, h, w)
        for level, layer in enumerate(self.levels, start=self.first_level):
            x = self._inject(layer(x), level, text_tokens, word_bias)
        words = text_tokens
        for into_text, block in zip(self.into_text, self.text_blocks, strict=True):
            words = block(into_text(words, x), mask)  # (B, T, D)
        pooled = torch.cat([x.mean(dim=(2, 3)), masked_mean(words, mask)], dim=1)
        return self.classifier(pooled)  # (B, K)

    def _inject(self, x: torch.Tensor, level: int, words: torch.Tensor, word_bias: torch.Tensor) -> torch.Tensor:
        return self.into_image[str(level)](x, words, word_bias) if level in self.inject_at else x

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        model = self.model_config
        lengths = torch.randint(1, model.max_tokens + 1, (batch_size, 1))
        present = torch.arange(model.max_tokens)[None, :] < lengths  # (B, T), right-padded as served
        token_ids = torch.randint(2, model.vocab_size, (batch_size, model.max_tokens)) * present
        text_tokens = torch.randn(batch_size, model.max_tokens, model.text_dim) * present[:, :, None]
        channels, side = level_shapes(model)[model.image_split]
        image_mid = torch.relu(torch.randn(batch_size, channels, side, side))
        return (image_mid, text_tokens, token_ids)


@register_expert("mi2p", Mi2pConfig)
def mi2p(model: DynamicFusionConfig, config: Mi2pConfig) -> ExpertParts:
    spec = ExpertSpec("mi2p", modalities=("text", "image"), components=("image_trunk", "mi2p"))
    return ExpertParts(spec, {"mi2p": Mi2pExpert(model, config)})
