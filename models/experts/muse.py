"""``muse``: MuSE's CrossTransformer (PAPERS.md section 3) over the words and the image encoder's patches.

The image encoder's last map (h x w patches) and the shared encoder's word features are projected to one width,
each gets a learned position and a CLS token, and both run through the SAME transformer layers (shared
parameters), each modality in its own sequence. In the exchange layers (mu..eta, 1-based), right after
self-attention, the theta share of each modality's tokens that its CLS attends to least (averaged over heads)
is replaced by the mean of the other modality's tokens plus itself (residual). The two CLS outputs,
concatenated, are classified.

Unlike the authors' per-sample loop, the exchange is vectorized over the batch and honours the padding mask:
padded words are never attended to, never chosen and never part of a mean. The tokens to exchange are picked
by rank (pairwise comparisons, no sort), which exports to plain ONNX operators.

The two regularizers of the paper (image captioning from the image embedding, text-to-image generation from the
text embedding, each on a noisy embedding) are kept in a light form, at training time only: a bag-of-words
prediction of the caption from the pooled image embedding, and an 8x8 thumbnail regressed from the pooled text
embedding. ``alpha`` and ``beta`` weigh them; 0 turns them off. They are never exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import level_shapes, masked_mean, token_mask
from models.experts import ExpertParts, ExpertSpec, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig

MASKED = -1e9  # attention logit of a padded word (finite: an all-padding text stays NaN-free)
# Attention scores are ranked on a grid of 1/4096: two scores closer than that tie and the earlier token wins.
# Without it a difference of 1e-7 between PyTorch and ONNX Runtime could swap which token is exchanged.
RANK_GRID = 4096.0
THUMBNAIL = 8  # side of the text-to-image regularizer's target


@dataclass
class MuseConfig:
    dim: int = 48  # token width in the CrossTransformer
    patch_pool: int = 2  # the image map is average-pooled by this before it becomes patches (8x8 -> 4x4 tokens)
    heads: int = 4
    layers: int = 4
    exchange_start: int = 2  # mu: the first exchange layer (1-based); the layers before it are plain
    exchange_end: int = 3  # eta: the last exchange layer (inclusive)
    exchange_ratio: float = 0.1  # theta: share of each modality's tokens exchanged per layer (at least one)
    ffn_ratio: int = 2  # feed-forward width / dim
    dropout: float = 0.1  # in the classifier, while training
    alpha: float = 0.1  # weight of the image-captioning regularizer (training only)
    beta: float = 0.1  # weight of the text-to-image regularizer (training only)
    noise_std: float = 1.0  # Gaussian noise on the embeddings the regularizers decode (the paper's N(0, 1))

    def __post_init__(self) -> None:
        assert 1 <= self.exchange_start <= self.exchange_end <= self.layers, (
            f"exchange layers {self.exchange_start}..{self.exchange_end} must lie within 1..{self.layers}"
        )
        assert 0.0 < self.exchange_ratio <= 1.0, f"exchange_ratio {self.exchange_ratio} must be in (0, 1]"
        assert self.dim % self.heads == 0, f"dim {self.dim} does not split into {self.heads} heads"


class CrossLayer(nn.Module):
    """A pre-norm transformer encoder layer, split where the exchange happens: ``attend`` then ``feed_forward``."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))

    def attend(self, x: torch.Tensor, key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention with a residual; also returns how much CLS attends to each other token, (B, N-1)."""
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )
        bias = key_bias[:, None, None, :]  # (B, 1, 1, N)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d_h), a fused kernel
        # The CLS row of the attention map again, on its own: one row costs little, the fused kernel keeps none.
        cls_logits = q[:, :, :1] @ k.transpose(2, 3) / math.sqrt(dim // self.heads) + bias  # (B, H, 1, N)
        cls_attention = F.softmax(cls_logits, dim=-1)[:, :, 0, 1:].mean(dim=1)  # (B, N-1), averaged over heads
        return x + self.out(mixed.transpose(1, 2).reshape(batch, length, dim)), cls_attention

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm2(x))


def exchange(
    tokens: torch.Tensor, cls_attention: torch.Tensor, valid: torch.Tensor, other_mean: torch.Tensor, ratio: float
):
    """MuSE's exchange: the ``ratio`` share of valid tokens least attended by CLS get ``other_mean`` added.

    tokens (B, N, D) without CLS; cls_attention (B, N); valid (B, N) float; other_mean (B, D)."""
    count = torch.ceil(ratio * valid.sum(dim=1, keepdim=True))  # (B, 1): at least one token of a non-empty input
    score = torch.round(cls_attention * RANK_GRID) + (1.0 - valid) * 1e9  # padding is never among the least
    positions = torch.arange(score.shape[1], device=score.device)
    earlier = positions[None, :] < positions[:, None]  # (N, N): [i, j] = j comes before i
    below = (score[:, None, :] < score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & earlier)
    rank = below.to(torch.float32).sum(dim=2)  # (B, N): tokens ranked before each one
    chosen = (rank < count).to(tokens.dtype) * valid  # (B, N)
    return tokens + chosen[:, :, None] * other_mean[:, None, :]


def _padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, N, ...) zero-padded along N to ``length``."""
    missing = length - tokens.shape[1]
    return tokens if missing == 0 else F.pad(tokens, (0, 0) * (tokens.dim() - 2) + (0, missing))


class MuseExpert(nn.Module):
    input_names = ("image_map", "text_tokens", "token_ids")
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: MuseConfig):
        super().__init__()
        self.model_config, self.config = model, config
        self.map_channels, self.map_side = level_shapes(model)[-1]
        self.pool = nn.AvgPool2d(config.patch_pool) if config.patch_pool > 1 else nn.Identity()
        side = self.map_side // config.patch_pool
        self.image_proj = nn.Linear(self.map_channels, config.dim)
        self.text_proj = nn.Linear(model.text_dim, config.dim)
        self.image_pos = nn.Parameter(torch.randn(side * side, config.dim) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(model.max_tokens, config.dim) * 0.02)
        self.cls_text = nn.Parameter(torch.empty(config.dim))
        self.cls_image = nn.Parameter(torch.empty(config.dim))
        for cls in (self.cls_text, self.cls_image):  # the authors' Kaiming initialization of cls
            nn.init.kaiming_normal_(cls[None, :])
        self.layers = nn.ModuleList(
            CrossLayer(config.dim, config.heads, config.ffn_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(2 * config.dim, model.num_classes))

    def embed(self, image_map: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """I_e (B, P, d) and T_e (B, T, d): the two modalities projected to one width, with positions."""
        patches = self.pool(image_map).flatten(2).transpose(1, 2)  # (B, P, C)
        return self.image_proj(patches) + self.image_pos, self.text_proj(text_tokens) + self.text_pos

    def forward(self, image_map: torch.Tensor, text_tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        image_embedding, text_embedding = self.embed(image_map, text_tokens)  # (B, P, d), (B, T, d)
        batch = image_embedding.shape[0]
        length = max(image_embedding.shape[1], text_embedding.shape[1])
        # The two modalities' encoders share their parameters, so both sequences go through each layer as one
        # batch (the shorter one padded, the padding masked): the same results at half the operator calls.
        image_valid = _padded(torch.ones_like(image_embedding[:, :, 0]), length)  # (B, L)
        text_valid = _padded(token_mask(token_ids), length)
        image = torch.cat([self.cls_image.expand(batch, 1, -1), _padded(image_embedding, length)], dim=1)
        text = torch.cat([self.cls_text.expand(batch, 1, -1), _padded(text_embedding, length)], dim=1)
        x = torch.cat([image, text], dim=0)  # (2B, 1+L, d): images first, then texts
        valid = torch.cat([image_valid, text_valid], dim=0)  # (2B, L)
        key_bias = torch.cat([torch.zeros_like(valid[:, :1]), (1.0 - valid) * MASKED], dim=1)  # CLS always attended
        config = self.config
        for number, layer in enumerate(self.layers, start=1):
            x, attention = layer.attend(x, key_bias)  # attention: (2B, L), CLS -> each other token
            if config.exchange_start <= number <= config.exchange_end:
                image, text = x[:batch], x[batch:]
                image_mean = masked_mean(image[:, 1:], image_valid)  # (B, d), both means from before either exchange
                text_mean = masked_mean(text[:, 1:], text_valid)
                ratio = config.exchange_ratio
                image_tokens = exchange(image[:, 1:], attention[:batch], image_valid, text_mean, ratio)
                text_tokens_ = exchange(text[:, 1:], attention[batch:], text_valid, image_mean, ratio)
                x = torch.cat(
                    [torch.cat([image[:, :1], image_tokens], dim=1), torch.cat([text[:, :1], text_tokens_], dim=1)],
                    dim=0,
                )
            x = layer.feed_forward(x)
        image_cls, text_cls = x[:batch, 0], x[batch:, 0]
        return self.classifier(torch.cat([self.norm(text_cls), self.norm(image_cls)], dim=1))  # (B, K)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        model = self.model_config
        lengths = torch.randint(1, model.max_tokens + 1, (batch_size, 1))
        present = torch.arange(model.max_tokens)[None, :] < lengths
        token_ids = torch.randint(2, model.vocab_size, (batch_size, model.max_tokens)) * present
        text_tokens = torch.randn(batch_size, model.max_tokens, model.text_dim) * present[:, :, None]
        image_map = torch.relu(torch.randn(batch_size, self.map_channels, self.map_side, self.map_side))
        return (image_map, text_tokens, token_ids)


class MuseRegularizers(nn.Module):
    """Training only. Image captioning, light: the caption's bag of words from the noisy pooled image embedding.
    Text-to-image, light: an 8x8 thumbnail of the picture from the noisy pooled text embedding."""

    def __init__(self, model: DynamicFusionConfig, config: MuseConfig):
        super().__init__()
        self.config = config
        self.caption = nn.Sequential(
            nn.Linear(config.dim, config.dim), nn.ReLU(), nn.Linear(config.dim, model.vocab_size)
        )
        pixels = 3 * THUMBNAIL * THUMBNAIL
        self.thumbnail = nn.Sequential(nn.Linear(config.dim, config.dim), nn.ReLU(), nn.Linear(config.dim, pixels))

    def forward(self, muse: MuseExpert, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        token_ids = tensors["token_ids"]
        mask = token_mask(token_ids)
        image_embedding, text_embedding = muse.embed(tensors["image_map"], tensors["text_tokens"])
        image_code = image_embedding.mean(dim=1)
        text_code = masked_mean(text_embedding, mask)
        image_code = image_code + config.noise_std * torch.randn_like(image_code)
        text_code = text_code + config.noise_std * torch.randn_like(text_code)
        words = torch.zeros(token_ids.shape[0], self.caption[-1].out_features, device=token_ids.device)
        words = words.scatter(1, token_ids, 1.0)[:, 2:]  # which words the caption has; <pad> and <unk> left out
        caption_loss = F.binary_cross_entropy_with_logits(self.caption(image_code)[:, 2:], words)
        target = F.adaptive_avg_pool2d(tensors["image"], THUMBNAIL).flatten(1)  # (B, 3*8*8), normalized pixels
        thumbnail_loss = F.mse_loss(self.thumbnail(text_code), target)
        return config.alpha * caption_loss + config.beta * thumbnail_loss


@register_expert("muse", MuseConfig)
def muse(model: DynamicFusionConfig, config: MuseConfig) -> ExpertParts:
    spec = ExpertSpec("muse", modalities=("text", "image"), components=("image_trunk", "image_encoder", "muse"))
    expert = MuseExpert(model, config)
    regularizers = MuseRegularizers(model, config)

    def auxiliary_loss(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if config.alpha == 0 and config.beta == 0:
            return tensors["image"].new_zeros(())
        return regularizers(expert, tensors)

    return ExpertParts(
        spec, {"muse": expert}, training_modules={"muse_regularizers": regularizers}, auxiliary_loss=auxiliary_loss
    )
