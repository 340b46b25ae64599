"""Runtime backends: run one stored component on NumPy inputs. ONNX Runtime or TorchScript, CPU or CUDA.

The interface is one call: ``backend.load(component)`` gives a function from named input arrays to
named output arrays. torch is imported only by the TorchScript backend, so serving ONNX needs none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from export.store import FORMATS, ComponentInfo
from models.errors import DynfuseError

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
BACKENDS = FORMATS  # a backend runs the component files of its own format


class BackendError(DynfuseError, RuntimeError):
    """The requested backend or device cannot run here."""


class Backend(ABC):
    name: str
    device: str

    @abstractmethod
    def load(self, component: ComponentInfo) -> Runner: ...

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    def file(self, component: ComponentInfo) -> str:
        """The component's file in this backend's format; a version exported without that format is refused
        with what to do (the shipped default model has ONNX files only)."""
        path = component.files.get(self.name)
        if path is None:
            other = " and ".join(component.files) or "no format"
            raise BackendError(
                f"{component.name}: this model version has no {self.name} file (it was exported with {other} only); "
                f"serve it with backend={next(iter(component.files), 'onnx')}, or export it again with "
                f"{self.name} files (dynfuse export, or make build-default for the default model)"
            )
        return str(path)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: the CUDA execution provider for device=cuda (needs onnxruntime-gpu), else the CPU one."""

    name = "onnx"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.device = device
        if device == "cuda":
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # the CUDA/cuDNN libraries pip installed beside onnxruntime-gpu
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "device=cuda needs onnxruntime-gpu with a working CUDA install; this onnxruntime offers "
                    f"{ort.get_available_providers()}. Install onnxruntime-gpu or use device=cpu."
                )
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: spinning kept a core busy between batches that
        # the event loop needed, and slowed the pipeline itself on a small machine (bench/BENCHMARKS.md).
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            self.options.intra_op_num_threads = threads
            self.options.inter_op_num_threads = 1

    def load(self, component: ComponentInfo) -> Runner:
        session = self._ort.InferenceSession(self.file(component), self.options, providers=self.providers)
        if self.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(f"{component.name}: ONNX Runtime did not place it on CUDA ({session.get_providers()})")
        output_names = [o.name for o in component.outputs]
        input_names = [i.name for i in component.inputs]

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = session.run(output_names, {name: inputs[name] for name in input_names})
            return dict(zip(output_names, outputs, strict=True))

        return run


class TorchScriptBackend(Backend):
    """TorchScript modules on CPU or CUDA (needs torch: ``pip install 'dynfuse[train]'``)."""

    name = "torchscript"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        try:
            import torch
        except ImportError as error:
            raise BackendError("backend=torchscript needs torch: pip install 'dynfuse[train]'") from error
        self._torch = torch
        self.device = device
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("device=cuda but torch sees no CUDA device; use device=cpu")
        if threads:
            torch.set_num_threads(threads)

    def load(self, component: ComponentInfo) -> Runner:
        torch = self._torch
        module = torch.jit.load(self.file(component), map_location=self.device).eval()
        output_names = [o.name for o in component.outputs]
        input_names = [i.name for i in component.inputs]

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in input_names]
                out = module(*tensors)
            out = out if isinstance(out, tuple) else (out,)
            return {name: t.cpu().numpy() for name, t in zip(output_names, out, strict=True)}

        return run


def create_backend(name: str, device: str = "cpu", threads: int | None = None) -> Backend:
    if name == "onnx":
        return OnnxRuntimeBackend(device, threads)
    if name == "torchscript":
        return TorchScriptBackend(device, threads)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
