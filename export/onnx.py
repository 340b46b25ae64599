"""ONNX export of one component: named inputs and outputs, a dynamic batch axis, ``onnx.checker``."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn


def export_onnx(module: nn.Module, path: Path, *, example_batch: int = 2) -> None:
    """Write ``module`` to ``path``; its inputs/outputs keep the module's declared names."""
    module.eval()
    inputs = module.example_inputs(example_batch)
    with torch.no_grad():
        module(*inputs)  # eager first: a broken module fails here, with a readable traceback
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic_shapes: tuple = tuple({0: batch} for _ in inputs)
    if _takes_varargs(module):  # a user's component (models/byo) takes its inputs as forward(*inputs): one tuple
        dynamic_shapes = (dynamic_shapes,)
    # The exporter narrates each step on stdout and logs that torchvision (deliberately absent) is missing.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            inputs,
            input_names=list(module.input_names),
            output_names=list(module.output_names),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            verbose=False,
            # The exporter's onnxscript optimizer deletes `x + 1e-8` as if the constant were 0 (seen with
            # torch 2.13 / onnxscript 0.7), which changed the router's importance by 2e-4. ONNX Runtime
            # optimizes the graph itself when it loads it, and parity checks guard the numbers.
            optimize=False,
        )
        program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _takes_varargs(module: nn.Module) -> bool:
    return any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values())


class OnnxComponent:
    """An exported component run by ONNX Runtime on CPU, for parity checks at export time."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[np.ndarray, ...]:
        feed = {i.name: t.numpy() for i, t in zip(self.session.get_inputs(), inputs, strict=True)}
        return tuple(self.session.run(self.output_names, feed))
