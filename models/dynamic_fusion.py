"""The dynamic fusion family: shared encoders, a cost ladder of experts and a dual router, with presets.

Components (each exported on its own):
    text_encoder    token_ids -> text_tokens, text_features     shared: runs for every request with text
    image_glimpse   thumbnail -> glimpse_features               shared: runs for every request with an image
    router          text/glimpse features -> expert_scores, importance
    image_trunk     image -> image_mid                          the CNN's first levels, run only inside experts
    image_encoder   image_mid -> image_features, image_map      the CNN's last levels   that use them
    ...             each expert family's own components (models/experts/), e.g. text_head, image_lite, mi2p

The experts are chosen by name (``config.experts``), each built by its registered family from its own config
(``config.expert_configs[name]``). Which one is the full path is decided after Stage I: the most accurate on
validation (models/training.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import ImageEncoder, ImageGlimpse, ImageTrunk, TextEncoder, thumbnail
from models.experts import ExpertParts, build_expert, family_config
from models.registry import register_model
from models.router import DualRouter

SHARED_ENCODERS = {"text": "text_encoder", "image": "image_glimpse"}  # modality -> component run for every request
IMAGE_CNN = ("image_trunk", "image_encoder")  # the CNN's two components, built when an expert's chain names them
DEFAULT_EXPERTS = ("text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse")


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
    image_split: int = 1  # the CNN levels 0..image_split (0: the stem) form the shared trunk; MI2P injects after it
    router_hidden: int = 32  # hidden width of each modality's router
    experts: tuple[str, ...] = DEFAULT_EXPERTS  # the cost ladder, in the router's output order
    expert_configs: dict = field(default_factory=dict)  # family name -> overrides of its dataclass config

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass comparable.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        stages = (len(self.image_widths), len(self.image_blocks), len(self.image_strides))
        assert len(set(stages)) == 1, f"image_widths/blocks/strides must have one entry per stage, got {stages}"
        assert 0 <= self.image_split < stages[0], f"image_split {self.image_split}: the CNN has levels 0..{stages[0]}"
        unused = set(self.expert_configs) - set(self.experts)
        assert not unused, f"expert_configs for experts the model does not have: {sorted(unused)}"
        # Every family's config resolved in full, so a checkpoint rebuilds the same model even if a family's
        # defaults change later.
        self.expert_configs = {
            name: asdict(family_config(name, self.expert_configs.get(name))) for name in self.experts
        }

    def to_dict(self) -> dict:
        return asdict(self)


class DynamicFusionModel(nn.Module):
    """All components of one model. ``components`` maps each exported name to its module."""

    def __init__(self, config: DynamicFusionConfig):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config)
        self.image_glimpse = ImageGlimpse(config)
        parts: list[ExpertParts] = [
            build_expert(name, config, config.expert_configs.get(name)) for name in config.experts
        ]
        self.experts = tuple(p.spec for p in parts)
        used = {name for spec in self.experts for name in spec.components}
        self.image_trunk = ImageTrunk(config) if "image_trunk" in used else None
        self.image_encoder = ImageEncoder(config) if "image_encoder" in used else None
        self.expert_components = nn.ModuleDict({name: m for p in parts for name, m in p.components.items()})
        self.router = self.new_router()
        # Stage I only, never exported or served: the glimpse's probe (it teaches the glimpse to see what matters)
        # and the families' own training-time modules (MuSE's regularizers).
        self.training_modules = nn.ModuleDict(
            {"glimpse_probe": nn.Linear(self.image_glimpse.out_dim, config.num_classes)}
            | {name: m for p in parts for name, m in p.training_modules.items()}
        )
        self._auxiliary_losses = [p.auxiliary_loss for p in parts if p.auxiliary_loss is not None]
        self._expert_losses = {p.spec.name: p.loss for p in parts if p.loss is not None}
        self.shared_encoders = dict(SHARED_ENCODERS)

    @property
    def components(self) -> dict[str, nn.Module]:
        shared = {"text_encoder": self.text_encoder, "image_glimpse": self.image_glimpse, "router": self.router}
        cnn = {name: getattr(self, name) for name in IMAGE_CNN if getattr(self, name) is not None}
        return shared | cnn | dict(self.expert_components.items())

    def expert(self, name: str):
        return next(e for e in self.experts if e.name == name)

    def new_router(self) -> DualRouter:
        """A freshly initialised router for this model's encoders (Stage II trains one per lambda)."""
        return DualRouter(self.config, glimpse_dim=self.image_glimpse.out_dim)

    # -- running experts the way the pipeline does: components by name, each at most once per batch -----------
    def run_components(self, names, tensors: dict[str, torch.Tensor], done: dict[str, dict]) -> dict:
        """``tensors`` plus the outputs of ``names`` run in order; ``done`` memoizes components across calls."""
        available = dict(tensors)
        components = self.components
        for name in names:
            if name not in done:
                module = components[name]
                outputs = module(*(available[i] for i in module.input_names))
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                done[name] = dict(zip(module.output_names, outputs, strict=True))
            available.update(done[name])
        return available

    def forward_experts(self, token_ids: torch.Tensor, image: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        """Every expert's logits on a batch with both modalities, and every tensor computed on the way."""
        done: dict[str, dict] = {}
        tensors = self.run_components(["text_encoder"], {"token_ids": token_ids, "image": image}, done)
        logits = {}
        for expert in self.experts:
            available = self.run_components(expert.components, tensors, done)
            logits[expert.name] = available["logits"]
        for outputs in done.values():
            tensors |= {k: v for k, v in outputs.items() if k != "logits"}
        return logits, tensors

    def expert_logits(self, token_ids: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_experts(token_ids, image)[0]

    def expert_loss(self, expert: str, logits: torch.Tensor, tensors: dict, labels: torch.Tensor) -> torch.Tensor:
        """Stage I's loss of one expert: its family's own (mulmix's multiplicative loss), else cross-entropy."""
        own = self._expert_losses.get(expert)
        return own(tensors, labels) if own is not None else F.cross_entropy(logits, labels)

    def auxiliary_loss(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stage I's extra terms: the glimpse probe's cross-entropy is added by training; this is the families'."""
        total = tensors["image"].new_zeros(())
        for loss in self._auxiliary_losses:
            total = total + loss(tensors)
        return total

    def glimpse(self, image: torch.Tensor) -> torch.Tensor:
        """The glimpse's features of normalized full-resolution images (B, Dg), through their thumbnails."""
        return self.image_glimpse(thumbnail(image, self.config.glimpse_size))

    def glimpse_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.training_modules["glimpse_probe"](self.glimpse(image))

    def route(self, token_ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores (B, N) and importance (B, 2) for a batch with both modalities."""
        present = torch.ones(token_ids.shape[0])
        text_features = self.text_encoder(token_ids)[1]
        scores, importance, _ = self.router(text_features, self.glimpse(image), present, present)
        return scores, importance


PRESETS = {
    # Seconds to train: unit and integration tests.
    "tiny": {
        "image_size": 32,
        "text_embed_dim": 16,
        "text_dim": 32,
        "glimpse_size": 8,
        "glimpse_channels": (4, 8),
        "image_stem": 8,
        "image_widths": (16,),
        "image_blocks": (1,),
        "image_strides": (2,),
        "image_split": 0,
        "router_hidden": 16,
        "expert_configs": {
            "image": {"hidden": 32},
            "late_fusion": {"hidden": 32},
            "mulmix": {"hidden": 32},
            "image_lite": {"channels": (4, 8, 8), "strides": (2, 2, 1)},
            "mi2p": {"inject_at": (0,), "hidden": 32},
            "muse": {"dim": 16, "heads": 2, "layers": 2, "exchange_start": 2, "exchange_end": 2},
        },
    },
    # The embedded default model: a few minutes on 2 CPU cores.
    "default": {},
    # ResNet-18 at 224x224 for GPU benchmarks.
    "large": {
        "image_size": 224,
        "max_tokens": 32,
        "text_embed_dim": 128,
        "text_dim": 256,
        "text_layers": 2,
        "glimpse_size": 28,
        "glimpse_channels": (16, 32),
        "image_stem": 64,
        "image_stem_kernel": 7,
        "image_stem_pool": True,
        "image_widths": (64, 128, 256, 512),
        "image_blocks": (2, 2, 2, 2),
        "image_strides": (1, 2, 2, 2),
        "image_split": 2,
        "router_hidden": 64,
        "expert_configs": {
            "image": {"hidden": 512},
            "late_fusion": {"hidden": 512},
            "mulmix": {"hidden": 512},
            "image_lite": {"downsample": 4, "channels": (32, 64, 128), "strides": (2, 2, 2)},
            "mi2p": {"inject_at": (2, 3), "heads": 4, "key_dim": 16, "hidden": 512},
            "muse": {"dim": 256, "heads": 8, "layers": 6, "exchange_start": 2, "exchange_end": 4},
        },
    },
}


def preset_config(preset: str, **overrides) -> DynamicFusionConfig:
    """A preset's config with ``overrides``; ``expert_configs`` overrides merge per family."""
    unknown = set(overrides) - {f.name for f in fields(DynamicFusionConfig)}
    if unknown:
        raise TypeError(f"unknown config fields {sorted(unknown)} for the dynamic_fusion family")
    values = {**PRESETS[preset], **overrides}
    families = dict(PRESETS[preset].get("expert_configs", {}))
    for name, family_overrides in overrides.get("expert_configs", {}).items():
        families[name] = {**families.get(name, {}), **family_overrides}
    experts = values.get("experts", DEFAULT_EXPERTS)
    values["expert_configs"] = {name: cfg for name, cfg in families.items() if name in experts}
    return DynamicFusionConfig(**values)


def _build(preset: str, overrides: dict) -> DynamicFusionModel:
    return DynamicFusionModel(preset_config(preset, **overrides))


@register_model
def dynamic_fusion_tiny(**overrides) -> DynamicFusionModel:
    return _build("tiny", overrides)


@register_model
def dynamic_fusion_default(**overrides) -> DynamicFusionModel:
    return _build("default", overrides)


@register_model
def dynamic_fusion_large(**overrides) -> DynamicFusionModel:
    return _build("large", overrides)
