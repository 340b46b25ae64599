"""``mulmix``: multiplicative combination of modality mixtures (PAPERS.md section 5).

Every non-empty subset of the modalities is a candidate: {text}, {image}, {text, image}. A candidate adds its
modalities' projected features (u_c = sum of h_k(v_k)) and classifies them on its own (p_c). The candidates
are combined multiplicatively: for each class y,

    q_c^y = [prod_{j != c} (1 - p_j^y)]^(beta / (M - 1))        (stop-gradient while training)
    l^y   = - sum_c q_c^y log p_c^y

so a candidate that is confident about the right class excuses the others from being right too (beta = 0:
plain averaging of the candidates' log-probabilities; beta = 1: no smoothing). The prediction is the class of
smallest l^y, and the component outputs -l as its logits, so that argmax and softmax work as for any expert.
Boosted training (``margin`` = delta) puts the loss only on samples whose true class does not already have the
smallest class loss by delta; the authors' shipped configurations leave it off, and so does the default here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.experts import MODALITIES, ExpertParts, ExpertSpec, register_expert

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig

# 1 - p is clamped away from 0 before its log: a candidate certain of a class would otherwise give -inf, and
# q = exp(-inf) = 0 is the right limit anyway.
MIN_COMPLEMENT = 1e-6


@dataclass
class MulMixConfig:
    hidden: int = 128  # width of the mixture space and of each candidate's classifier
    beta: float = 0.1  # down-weighting strength: the authors use 0.1-0.2; 0.1 did best here (bench/mulmix.py)
    margin: float | None = None  # boosted training's delta; None: off
    dropout: float = 0.1  # in the candidates' classifiers, while training

    def __post_init__(self) -> None:
        assert 0.0 <= self.beta <= 1.0, f"beta {self.beta} must be in [0, 1]"
        assert self.margin is None or self.margin >= 0, f"margin {self.margin} must be >= 0 or None"


def candidates(modalities: tuple[str, ...] = MODALITIES) -> tuple[tuple[str, ...], ...]:
    """Every non-empty subset of the modalities, singletons first."""
    return tuple(c for size in range(1, len(modalities) + 1) for c in combinations(modalities, size))


def log_one_minus(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - p_y) for every class y of (..., K) log-probabilities, as log(sum of the other classes' p).

    The direct 1 - exp(log p) cancels where p is close to 1: float32 keeps about 7 digits, so ONNX Runtime and
    PyTorch, whose exp differ in the last bit, disagreed there by 3e-4 on a served model. Summing the other
    classes' probabilities (a logsumexp with the class itself masked out) has no such cancellation."""
    k = log_probs.shape[-1]
    mask = torch.eye(k, dtype=log_probs.dtype, device=log_probs.device) * -1e4  # exp(-1e4) = 0: y left out
    return torch.logsumexp(log_probs.unsqueeze(-2) + mask, dim=-1)


class MulMixExpert(nn.Module):
    input_names = ("text_features", "image_features")
    output_names = ("logits",)

    def __init__(self, model: DynamicFusionConfig, config: MulMixConfig):
        super().__init__()
        self.config = config
        self.widths = {"text": model.text_dim, "image": model.image_widths[-1]}
        self.project = nn.ModuleDict({m: nn.Linear(width, config.hidden) for m, width in self.widths.items()})
        self.candidates = candidates()
        self.classifiers = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, config.hidden),
                nn.ReLU(),
                nn.Linear(config.hidden, model.num_classes),
            )
            for _ in self.candidates
        )

    def candidate_log_probs(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """log p_c for every candidate: (C, B, K)."""
        projected = {"text": self.project["text"](text_features), "image": self.project["image"](image_features)}
        return torch.stack(
            [
                F.log_softmax(classifier(sum(projected[m] for m in candidate)), dim=-1)
                for candidate, classifier in zip(self.candidates, self.classifiers, strict=True)
            ]
        )

    def class_losses(self, log_probs: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """l^y for every class: (B, K) from (C, B, K) log-probabilities."""
        count = log_probs.shape[0]
        log_complement = torch.clamp(log_one_minus(log_probs), min=math.log(MIN_COMPLEMENT))  # log(1 - p_c^y)
        others = log_complement.sum(dim=0, keepdim=True) - log_complement  # sum over j != c
        weights = torch.exp(self.config.beta / max(count - 1, 1) * others)  # q_c^y
        if detach_weights:
            weights = weights.detach()
        return -(weights * log_probs).sum(dim=0)

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return -self.class_losses(self.candidate_log_probs(text_features, image_features))  # (B, K)

    def loss(self, text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The multiplicative training loss, boosted when a margin is set."""
        losses = self.class_losses(self.candidate_log_probs(text_features, image_features), detach_weights=True)
        true = losses.gather(1, labels[:, None])  # (B, 1)
        if self.config.margin is not None:
            others = losses.scatter(1, labels[:, None], float("inf"))  # the true class never beats itself
            already_right = (true + self.config.margin < others).all(dim=1, keepdim=True)
            true = true * (~already_right)  # boosted: only samples still wrong by the margin count
        return true.mean()

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, self.widths["text"]), torch.randn(batch_size, self.widths["image"]))


@register_expert("mulmix", MulMixConfig)
def mulmix(model: DynamicFusionConfig, config: MulMixConfig) -> ExpertParts:
    spec = ExpertSpec("mulmix", modalities=("text", "image"), components=("image_trunk", "image_encoder", "mulmix"))
    expert = MulMixExpert(model, config)

    def loss(tensors: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return expert.loss(tensors["text_features"], tensors["image_features"], labels)

    return ExpertParts(spec, {"mulmix": expert}, loss=loss)
