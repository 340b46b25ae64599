"""The router-only model: dynfuse's own router encoders and dual router over frozen user experts.

Components, as the built-in family names them (so costs, Stage II, export and the pipeline need no new case):
    text_encoder    token_ids -> text_tokens, text_features    dynfuse's small word-level encoder, trained here
    image_glimpse   thumbnail -> glimpse_features              the router's cheap look at the picture, trained here
    router          DRDF dual router + MWF over the user experts
    <expert>.<c>    each user expert's components, frozen, on their own spec tensors (models/byo/components.py)

The user experts are not submodules: the checkpoint holds only what dynfuse trains, and export rebuilds the
experts by calling their factories again, refusing any whose weights, specs or labels changed since the router
was trained (their fingerprints). So this family is not in the model registry (models/registry.py builds a model
from its config alone): ``rebuild_router_only`` rebuilds it from a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from models.byo.components import ExpertChain
from models.byo.loading import ExpertError, ExpertRef, load_experts
from models.dynamic_fusion import PRESETS, SHARED_ENCODERS, preset_config
from models.encoders import ImageGlimpse, TextEncoder, thumbnail
from models.router import DualRouter
from models.specs import Spec

ROUTER_ONLY = "router_only"
# What the router's encoders take from a dynamic_fusion preset: their sizes, nothing about experts.
ENCODER_FIELDS = ("max_tokens", "image_size", "text_embed_dim", "text_dim", "text_layers", "glimpse_size",
                  "glimpse_channels", "router_hidden")  # fmt: skip


@dataclass
class RouterOnlyConfig:
    labels: tuple[str, ...]  # the data's labels; every expert's logits come in this order
    experts: tuple[dict, ...]  # [{"name", "target", "origin", "fingerprint"}], in the router's output order
    vocab_size: int  # the router's word tokenizer, built from the training captions
    preset: str = "default"  # the sizes of the router's encoders: a dynamic_fusion preset
    search: tuple[str, ...] = ()  # directories the factories were imported from, tried after the current one
    # The encoders' sizes, filled from the preset (models/dynamic_fusion.py PRESETS) unless given.
    max_tokens: int = 0
    image_size: int = 0
    text_embed_dim: int = 0
    text_dim: int = 0
    text_layers: int = 0
    glimpse_size: int = 0
    glimpse_channels: tuple[int, ...] = ()
    router_hidden: int = 0
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.labels, self.search = tuple(self.labels), tuple(self.search)
        self.experts = tuple(dict(e) for e in self.experts)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = preset_config(self.preset)
        for name in ENCODER_FIELDS:
            if not getattr(self, name):
                setattr(self, name, getattr(preset, name))
        self.glimpse_channels = tuple(self.glimpse_channels)
        self.num_classes = len(self.labels)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in {f.name for f in fields(self) if f.init}}


class RouterOnlyModel(nn.Module):
    def __init__(self, config: RouterOnlyConfig, chains: list[ExpertChain] | None = None):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config)  # type: ignore[arg-type]  # reads only the sizes
        self.image_glimpse = ImageGlimpse(config)  # type: ignore[arg-type]
        self.router = self.new_router()
        # Trained with the encoders (train_router_encoders), never exported: a linear probe per modality.
        self.training_modules = nn.ModuleDict(
            {
                "text_probe": nn.Linear(config.text_dim, config.num_classes),
                "glimpse_probe": nn.Linear(self.image_glimpse.out_dim, config.num_classes),
            }
        )
        if chains is None:
            chains = _reload_experts(config)
        self.chains = {chain.name: chain for chain in chains}  # a plain dict: no user weight in state_dict()
        self.experts = tuple(chain.spec for chain in chains)
        self.shared_encoders = dict(SHARED_ENCODERS)

    @property
    def components(self) -> dict[str, nn.Module]:
        shared = {"text_encoder": self.text_encoder, "image_glimpse": self.image_glimpse, "router": self.router}
        return shared | {name: c for chain in self.chains.values() for name, c in chain.components.items()}

    @property
    def specs(self) -> dict[str, Spec]:
        """Every distinct preprocessing spec of the experts, by key."""
        return {key: spec for chain in self.chains.values() for key, spec in chain.specs.items()}

    def expert(self, name: str):
        return next(e for e in self.experts if e.name == name)

    def new_router(self) -> DualRouter:
        return DualRouter(self.config, glimpse_dim=self.image_glimpse.out_dim)  # type: ignore[arg-type]

    def glimpse(self, image: torch.Tensor) -> torch.Tensor:
        """The glimpse's features of normalized images at the router's size (B, Dg), through their thumbnails."""
        return self.image_glimpse(thumbnail(image, self.config.glimpse_size))

    def route(self, token_ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores (B, N) and importance (B, 2) for a batch with both modalities."""
        present = torch.ones(token_ids.shape[0])
        scores, importance, _ = self.router(self.text_encoder(token_ids)[1], self.glimpse(image), present, present)
        return scores, importance

    @torch.no_grad()
    def expert_logits(self, spec_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every expert's logits (B, K) in the data's label order, from the batch's spec tensors."""
        return {name: chain.run(spec_tensors) for name, chain in self.chains.items()}


def _reload_experts(config: RouterOnlyConfig) -> list[ExpertChain]:
    """The experts again, from their factories, as they were when the router was trained, or a refusal."""
    from pathlib import Path

    refs = [ExpertRef(e["name"], e["target"], e["origin"]) for e in config.experts]
    chains = load_experts(refs, config.labels, search=[Path(d) for d in config.search])
    for chain, recorded in zip(chains, config.experts, strict=True):
        if chain.fingerprint() != recorded["fingerprint"]:
            raise ExpertError(
                f"expert {chain.name}: its weights, preprocessing or labels changed since the router was trained "
                f"({recorded['target']}); the router learnt from other outputs: run dynfuse train-router again"
            )
    return chains


def rebuild_router_only(checkpoint: dict) -> RouterOnlyModel:
    """The trained router-only model (served router loaded) from a run checkpoint and the experts' factories.

    Not in the model registry: it cannot be built from a config alone, its experts come from the user's code."""
    model = RouterOnlyModel(RouterOnlyConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
