"""The router: DRDF's dual router and modal weight fusion (MWF), whose fused scores drive DynMM's hard choice.

Each modality has its own small router giving a sigmoid weight per expert (several experts may be
weighted high at once). MWF turns the spread of each router's weights into that modality's
importance (a decisive router has spread-out weights, an unsure one flat weights) and fuses the two
weight vectors with those importances. The served expert is the argmax of the fused weights; the
response reports a softmax of their log-odds (same order, sums to one), and the importances as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


# Each router's std is taken as sqrt(variance + STD_EPSILON**2): smooth where the weights are all
# equal (a plain sqrt has an infinite slope at 0, which turns gradients into NaN), still exactly 0.5
# each when both routers are flat, as DRDF specifies, and stable to rounding noise there. It changes
# a decisive router's importance (std ~0.1-0.5) by well under 0.1%.
STD_EPSILON = 1e-4


def modality_importance(
    omega_text: torch.Tensor,  # (B, N) sigmoid weights of the text router
    omega_image: torch.Tensor,  # (B, N) sigmoid weights of the image router
    text_present: torch.Tensor,  # (B,) 1.0 where the request has text
    image_present: torch.Tensor,  # (B,) 1.0 where it has an image
) -> torch.Tensor:
    """MWF: Importance_m = std(omega_m) / (std(omega_text) + std(omega_image)), both stds 0 -> 0.5 each;
    a modality alone has importance 1. Returns (B, 2): text, image."""
    std_text = _smooth_std(omega_text)  # (B,)
    std_image = _smooth_std(omega_image)
    share_text = std_text / (std_text + std_image)
    both = text_present * image_present
    importance_text = both * share_text + (1.0 - both) * text_present  # one modality alone: 1 or 0
    return torch.stack([importance_text, 1.0 - importance_text], dim=1)


def modal_weight_fusion(
    omega_text: torch.Tensor, omega_image: torch.Tensor, text_present: torch.Tensor, image_present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRDF's fusion in linear space, omega_fused = omega_text * Importance_text + omega_image * Importance_image.

    The router computes the same thing in log space (``gate_logits``); this form is the reference the
    tests hold it to. Returns (fused (B, N), importance (B, 2))."""
    importance = modality_importance(omega_text, omega_image, text_present, image_present)
    fused = importance[:, :1] * omega_text + importance[:, 1:] * omega_image  # (B, N)
    return fused, importance


# The two helpers below are written out because their torch versions export to naive ONNX graphs
# (log(sigmoid(x)), log(exp(a) + exp(b))) that underflow to -inf and NaN for the very negative
# logits a trained router produces; the parity checks at export caught both.


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)), finite for every finite x."""
    return torch.clamp(x, max=0.0) - torch.log(1.0 + torch.exp(-torch.abs(x)))


def _log_add_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) without underflow."""
    high = torch.maximum(a, b)
    return high + torch.log(torch.exp(a - high) + torch.exp(b - high))


def _smooth_std(weights: torch.Tensor) -> torch.Tensor:
    """Population std over the experts, smoothed by STD_EPSILON (written out: plain ONNX ops)."""
    centred = weights - weights.mean(dim=1, keepdim=True)
    return (centred.square().mean(dim=1) + STD_EPSILON**2).sqrt()


class DualRouter(nn.Module):
    """Text router on the text features, image router on the glimpse, fused by MWF."""

    input_names = ("text_features", "glimpse_features", "text_present", "image_present")
    output_names = ("expert_scores", "importance", "expert_weights")

    def __init__(self, config: DynamicFusionConfig, glimpse_dim: int):
        super().__init__()
        self.config = config
        self.glimpse_dim = glimpse_dim
        num_experts = len(config.experts)
        self.text_router = nn.Sequential(
            nn.Linear(config.text_dim, config.router_hidden), nn.ReLU(), nn.Linear(config.router_hidden, num_experts)
        )
        self.image_router = nn.Sequential(
            nn.Linear(glimpse_dim, config.router_hidden), nn.ReLU(), nn.Linear(config.router_hidden, num_experts)
        )
        # Start neutral, every expert weighted alike: a router that starts favouring one expert starves the
        # others of gradient (a softmax gate's rich-get-richer collapse) before their losses are seen.
        for router in (self.text_router, self.image_router):
            nn.init.zeros_(router[-1].weight)
            nn.init.zeros_(router[-1].bias)

    def forward(
        self,
        text_features: torch.Tensor,  # (B, Dt); zeros where the text is missing
        glimpse_features: torch.Tensor,  # (B, Dg); zeros where the image is missing
        text_present: torch.Tensor,  # (B,)
        image_present: torch.Tensor,  # (B,)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (B, N) summing to 1, importance (B, 2), and the fused weights omega_fused (B, N) themselves,
        which DRDF's soft expert fusion mixes the experts' outputs with."""
        gate_logits, importance = self.gate_logits(text_features, glimpse_features, text_present, image_present)
        return F.softmax(gate_logits, dim=1), importance, torch.sigmoid(gate_logits)  # argmax = argmax of fused

    def router_logits(self, text_features: torch.Tensor, glimpse_features: torch.Tensor):
        """Each modality's router before its sigmoid: (B, N) text, (B, N) image."""
        return self.text_router(text_features), self.image_router(glimpse_features)

    def gate_logits(self, text_features, glimpse_features, text_present, image_present):
        """logit(omega_fused) (B, N) and importance (B, 2).

        The gate is the log-odds of the fused weight, log(omega_fused / (1 - omega_fused)): the same order as
        the fused weights (so the served expert is still their argmax), but unbounded. Sigmoid weights saturate
        at 1, and two experts both weighted ~1 would tie for good in log(omega_fused); in log-odds they stay
        apart and keep their gradients. Both halves are formed from the routers' logits, so they stay finite
        however far a router pushes its weights."""
        logits_text, logits_image = self.router_logits(text_features, glimpse_features)  # (B, N) each
        importance = modality_importance(
            torch.sigmoid(logits_text), torch.sigmoid(logits_image), text_present, image_present
        )
        log_importance = torch.log(importance.clamp_min(1e-30))  # an absent modality: weight ~0, not -inf
        log_text, log_image = log_importance[:, :1], log_importance[:, 1:]
        log_fused = _log_add_exp(log_text + _log_sigmoid(logits_text), log_image + _log_sigmoid(logits_image))
        # 1 - omega_fused = I_text * sigmoid(-l_text) + I_image * sigmoid(-l_image): the importances sum to 1.
        log_rest = _log_add_exp(log_text + _log_sigmoid(-logits_text), log_image + _log_sigmoid(-logits_image))
        return log_fused - log_rest, importance

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        # Separate tensors with mixed patterns: one object passed twice would make the exporter fuse
        # the two inputs into one, and equal patterns would let a parity check miss a swap.
        text_present = (torch.arange(batch_size) % 3 != 2).to(torch.float32)  # 1, 1, 0, 1, 1, 0, ...
        image_present = (torch.arange(batch_size) % 3 != 1).to(torch.float32)  # 1, 0, 1, 1, 0, 1, ...
        features = (torch.randn(batch_size, self.config.text_dim), torch.randn(batch_size, self.glimpse_dim))
        return (*features, text_present, image_present)
