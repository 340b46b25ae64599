"""The dynamic fusion family: shared encoders, three experts and a dual router, with presets.

Components (each exported on its own, see ``COMPONENT_NAMES``):
    text_encoder   token_ids -> text_features          shared: runs for every request with text
    image_glimpse  image -> glimpse_features           shared: runs for every request with an image
    router         text/glimpse features -> expert_scores, importance
    text_head      text_features -> logits             expert "text"
    image_encoder  image -> image_features             experts "image" and "late_fusion"
    image_head     image_features -> logits            expert "image"
    fusion_head    text_features, image_features -> logits    expert "late_fusion" (the full path)

Training (models/training.py) uses ``expert_logits`` for Stage I and one router per lambda for Stage II.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from models.encoders import ImageEncoder, ImageGlimpse, TextEncoder
from models.experts import ExpertSpec, FusionHead, ImageHead, TextHead
from models.registry import register_model
from models.router import DualRouter

EXPERTS = (
    ExpertSpec("text", modalities=("text",), components=("text_head",)),
    ExpertSpec("image", modalities=("image",), components=("image_encoder", "image_head")),
    ExpertSpec("late_fusion", modalities=("text", "image"), components=("image_encoder", "fusion_head")),
)
FULL_EXPERT = "late_fusion"
SHARED_ENCODERS = {"text": "text_encoder", "image": "image_glimpse"}  # modality -> component run for every request
COMPONENT_NAMES = ("text_encoder", "image_glimpse", "router", "text_head", "image_encoder", "image_head", "fusion_head")


@dataclass
class DynamicFusionConfig:
    num_classes: int = 12  # labels of the data set
    vocab_size: int = 256  # tokenizer vocabulary, <pad> and <unk> included
    max_tokens: int = 16  # captions are padded/truncated to this many words
    image_size: int = 64  # square input side of the image components
    text_embed_dim: int = 32  # word embedding width
    text_dim: int = 64  # text feature width (conv channels)
    text_layers: int = 1  # 1-D convolutions over the words
    glimpse_size: int = 16  # side of the router's thumbnail; image_size must be a multiple
    glimpse_channels: tuple[int, ...] = (8, 16)  # the glimpse's conv widths (first stride 1, then 2)
    image_stem: int = 16  # CNN stem width
    image_stem_kernel: int = 3  # 7 for ResNet-18
    image_stem_pool: bool = False  # ResNet's max-pool after the stem
    image_widths: tuple[int, ...] = (32, 64)  # width of each CNN stage
    image_blocks: tuple[int, ...] = (1, 1)  # residual blocks per stage
    image_strides: tuple[int, ...] = (2, 2)  # first-block stride per stage
    fusion_hidden: int = 128  # late-fusion MLP width
    router_hidden: int = 32  # hidden width of each modality's router
    dropout: float = 0.1  # in the heads, while training
    experts: tuple[str, ...] = tuple(e.name for e in EXPERTS)  # router output order

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        stages = (len(self.image_widths), len(self.image_blocks), len(self.image_strides))
        assert len(set(stages)) == 1, f"image_widths/blocks/strides must have one entry per stage, got {stages}"

    def to_dict(self) -> dict:
        return asdict(self)


class DynamicFusionModel(nn.Module):
    """All components of one model. ``components`` maps each exported name to its module."""

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config)
        self.image_glimpse = ImageGlimpse(config)
        self.router = self.new_router()
        self.text_head = TextHead(config)
        self.image_encoder = ImageEncoder(config)
        self.image_head = ImageHead(config)
        self.fusion_head = FusionHead(config)
        # Stage I only: teaches the glimpse to see what matters; never exported or served.
        self.glimpse_probe = nn.Linear(self.image_glimpse.out_dim, config.num_classes)
        self.experts = EXPERTS
        self.full_expert = FULL_EXPERT
        self.shared_encoders = SHARED_ENCODERS

    @property
    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENT_NAMES}

    def expert_logits(self, token_ids: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every expert's logits on a batch with both modalities (training and evaluation)."""
        return self.heads(self.text_encoder(token_ids), self.image_encoder(image))

    def heads(self, text_features: torch.Tensor, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every expert's logits from the encoders' features (B, Dt) and (B, Di)."""
        return {
            "text": self.text_head(text_features),
            "image": self.image_head(image_features),
            "late_fusion": self.fusion_head(text_features, image_features),
        }

    def new_router(self) -> DualRouter:
        """A freshly initialised router for this model's encoders (Stage II trains one per lambda)."""
        return DualRouter(self.config, glimpse_dim=self.image_glimpse.out_dim)

    def glimpse_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.glimpse_probe(self.image_glimpse(image))

    def route(self, token_ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores (B, N) and importance (B, 2) for a batch with both modalities."""
        present = torch.ones(token_ids.shape[0])
        return self.router(self.text_encoder(token_ids), self.image_glimpse(image), present, present)


def _preset(**values) -> dict:
    return values


PRESETS = {
    # Seconds to train: unit and integration tests.
    "tiny": _preset(
        image_size=32,
        text_embed_dim=16,
        text_dim=32,
        glimpse_size=8,
        glimpse_channels=(4, 8),
        image_stem=8,
        image_widths=(16,),
        image_blocks=(1,),
        image_strides=(2,),
        fusion_hidden=32,
        router_hidden=16,
    ),
    # The embedded default model: a few minutes on 2 CPU cores.
    "default": _preset(),
    # ResNet-18 at 224x224 for GPU benchmarks.
    "large": _preset(
        image_size=224,
        max_tokens=32,
        text_embed_dim=128,
        text_dim=256,
        text_layers=2,
        glimpse_size=28,
        glimpse_channels=(16, 32),
        image_stem=64,
        image_stem_kernel=7,
        image_stem_pool=True,
        image_widths=(64, 128, 256, 512),
        image_blocks=(2, 2, 2, 2),
        image_strides=(1, 2, 2, 2),
        fusion_hidden=512,
        router_hidden=64,
    ),
}


def _build(preset: str, overrides: dict) -> DynamicFusionModel:
    unknown = set(overrides) - {f.name for f in fields(DynamicFusionConfig)}
    if unknown:
        raise TypeError(f"unknown config fields {sorted(unknown)} for the dynamic_fusion family")
    return DynamicFusionModel(DynamicFusionConfig(**{**PRESETS[preset], **overrides}))


@register_model
def dynamic_fusion_tiny(**overrides) -> DynamicFusionModel:
    return _build("tiny", overrides)


@register_model
def dynamic_fusion_default(**overrides) -> DynamicFusionModel:
    return _build("default", overrides)


@register_model
def dynamic_fusion_large(**overrides) -> DynamicFusionModel:
    return _build("large", overrides)
