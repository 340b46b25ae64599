"""Parity of an exported component against eager PyTorch; an export that disagrees is refused."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from models.errors import DynfuseError

# float32 end to end; differences come from operator order only. 1e-4 on logits is ~1e-6 relative
# for this model's activations, far below anything that could flip a decision.
TOLERANCE = 1e-4


class ParityError(DynfuseError, RuntimeError):
    pass


def max_abs_difference(
    module: nn.Module, exported: Callable[..., tuple[np.ndarray, ...]], input_sets: Iterable[tuple[torch.Tensor, ...]]
) -> float:
    """Largest absolute difference over every output of every input set."""
    worst = 0.0
    module.eval()
    for inputs in input_sets:
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for want, got in zip(expected, exported(*inputs), strict=True):
            assert got.shape == tuple(want.shape), f"shape {got.shape} != eager {tuple(want.shape)}"
            difference = np.abs(want.numpy() - got)
            if not np.isfinite(difference).all():
                return float("nan")  # a NaN or inf on either side fails the check (max() would skip a NaN)
            worst = max(worst, float(difference.max(initial=0.0)))
    return worst


def check_parity(name: str, fmt: str, difference: float, tolerance: float = TOLERANCE) -> None:
    if not difference <= tolerance:  # also catches NaN
        raise ParityError(
            f"{name} ({fmt}) differs from eager PyTorch by {difference:.3g} > {tolerance:g}; nothing was written"
        )
