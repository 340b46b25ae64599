"""The router: DRDF's dual router and modal weight fusion (MWF), whose fused scores drive DynMM's hard choice.

Each modality has its own small router giving a sigmoid weight per expert (several experts may be
weighted high at once). MWF turns the spread of each router's weights into that modality's
importance (a decisive router has spread-out weights, an unsure one flat weights) and fuses the two
weight vectors with those importances. The served expert is the argmax of the fused weights; the
response reports them normalized to sum to one, and the importances as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from models.dynamic_fusion import DynamicFusionConfig


def modal_weight_fusion(
    omega_text: torch.Tensor,  # (B, N) sigmoid weights of the text router
    omega_image: torch.Tensor,  # (B, N) sigmoid weights of the image router
    text_present: torch.Tensor,  # (B,) 1.0 where the request has text
    image_present: torch.Tensor,  # (B,) 1.0 where it has an image
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance_m = std(omega_m) / (std(omega_text) + std(omega_image)); both stds 0 -> 0.5 each;
    a single present modality has importance 1. Returns (fused weights (B, N), importance (B, 2))."""
    std_text = _population_std(omega_text)  # (B,)
    std_image = _population_std(omega_image)
    total = std_text + std_image
    # The where() keeps the division finite for the zero-std case, which it then replaces by 0.5.
    share_text = torch.where(total > 0, std_text / torch.where(total > 0, total, torch.ones_like(total)), 0.5)
    both = text_present * image_present
    importance_text = both * share_text + (1.0 - both) * text_present  # one modality alone: 1 or 0
    importance_image = 1.0 - importance_text
    fused = importance_text[:, None] * omega_text + importance_image[:, None] * omega_image  # (B, N)
    return fused, torch.stack([importance_text, importance_image], dim=1)


def _population_std(weights: torch.Tensor) -> torch.Tensor:
    centred = weights - weights.mean(dim=1, keepdim=True)
    return centred.square().mean(dim=1).sqrt()  # written out: exports to plain ONNX ops everywhere


class DualRouter(nn.Module):
    """Text router on the text features, image router on the glimpse, fused by MWF."""

    input_names = ("text_features", "glimpse_features", "text_present", "image_present")
    output_names = ("expert_scores", "importance")

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

    def forward(
        self,
        text_features: torch.Tensor,  # (B, Dt); zeros where the text is missing
        glimpse_features: torch.Tensor,  # (B, Dg); zeros where the image is missing
        text_present: torch.Tensor,  # (B,)
        image_present: torch.Tensor,  # (B,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        omega_text = torch.sigmoid(self.text_router(text_features))  # (B, N)
        omega_image = torch.sigmoid(self.image_router(glimpse_features))  # (B, N)
        fused, importance = modal_weight_fusion(omega_text, omega_image, text_present, image_present)
        expert_scores = fused / fused.sum(dim=1, keepdim=True)  # (B, N), sums to 1
        return expert_scores, importance

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        present = torch.ones(batch_size)
        return (
            torch.randn(batch_size, self.config.text_dim),
            torch.randn(batch_size, self.glimpse_dim),
            present,
            present,
        )
