"""TorchScript export of one component (traced: the components have no data-dependent control flow)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def export_torchscript(module: nn.Module, path: Path, *, example_batch: int = 2) -> None:
    module.eval()
    inputs = module.example_inputs(example_batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(path))


class TorchScriptComponent:
    """A saved TorchScript component, for parity checks at export time."""

    def __init__(self, path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, *inputs: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            out = self.module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(t.numpy() for t in out)
