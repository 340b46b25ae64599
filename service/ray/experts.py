"""The model cut in two for Ray Serve: the ingress runs the shared encoders, the router and the policy; each
expert runs in a deployment of its own. Nothing here imports Ray: the ingress talks to the experts through
handles (``handle.run.remote(sub_batch).result(timeout_s=...)``), which is all a Serve ``DeploymentHandle`` is
asked for.

What crosses between the two is one sub-batch per expert and ingress batch: the tensors the expert's chain
reads that it does not produce itself (the token ids, the text encoder's outputs, and the picture as uint8
pixels, normalized on the expert's side: a quarter of the bytes of the float image), and the logits back.
The answers are then the single-process pipeline's: the same policy code picks the expert, and the expert's
components are the same files, run by the same ``BatchExecution``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from export.attribution import EXACT, HEAD, WANT_EXACT, WANT_HEAD, read_attribution
from export.backends import Backend, Runner
from export.execution import BatchExecution
from export.pipeline import SOFT, DynamicPipeline, PipelineInput, PipelineOutput
from export.store import StoredModel
from models.ood import MAP_TENSOR
from service.errors import ApiError, DeadlineExceeded, NotReady

logger = logging.getLogger("dynfuse")

READY_TIMEOUT_S = 300.0  # an expert deployment answers its first call within this (it may still be starting)
PIXELS = "pixels"  # the sub-batch's images: (n, S, S, 3) uint8, where the chain reads the normalized "image"
WANTS = "attribution"  # (n,) int64: what each row asks for its attribution (export/attribution.py's flags)
# What an expert returns per row, (n, 5, K): its logits, then the coalition logits (text only, image only) by its
# attribution head and exactly, NaN where the row did not ask for them.
LOGITS, HEAD_PAIR, EXACT_PAIR = 0, slice(1, 3), slice(3, 5)
# What an expert returns: that array under OUTPUTS, and, when the model's out-of-distribution density reads the image
# encoder's map (models/ood.py) and the expert's chain produced it, that map under MAP_TENSOR (NaN for rows whose
# chain did not run the encoder): the ingress's p-values are then the single process's.
OUTPUTS = "outputs"
EXPERT_RETRY_AFTER_S = 1


def expert_inputs(model: StoredModel, expert: str) -> tuple[str, ...]:
    """The tensors an expert's chain reads that none of its components produces, in first-use order."""
    produced: set[str] = set()
    needed: dict[str, None] = {}
    for component in model.expert(expert).components:
        info = model.components[component]
        for tensor in info.inputs:
            if tensor.name not in produced:
                needed.setdefault(tensor.name)
        produced |= {tensor.name for tensor in info.outputs}
    return tuple(needed)


def wire_names(model: StoredModel, expert: str) -> tuple[str, ...]:
    """What the ingress sends an expert: its inputs, with the normalized image as its uint8 pixels, and what each
    row asks for its attribution."""
    return (*(PIXELS if name == "image" else name for name in expert_inputs(model, expert)), WANTS)


class ExpertWorker:
    """One expert of a stored model, on its own: loads only its chain's components and runs a sub-batch."""

    def __init__(self, model: StoredModel, backend: Backend, expert: str):
        self.model = model
        self.backend = backend
        self.expert = expert
        self.inputs = wire_names(model, expert)
        self.attributions = read_attribution(model)
        head = self.attributions[expert].head
        chain = (*model.expert(expert).components, *((head,) if head else ()))
        self._runners: dict[str, Runner] = {c: backend.load(model.components[c]) for c in chain}
        self.sends_map = model.ood is not None and MAP_TENSOR in model.ood.views

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """For a sub-batch holding exactly ``self.inputs``: under OUTPUTS, (n, 5, K) the expert's logits, then the
        coalition logits its rows asked for (NaN elsewhere); under MAP_TENSOR, the image encoder's map where the
        model's density reads it and the chain produced it (module docstring)."""
        assert set(tensors) == set(self.inputs), f"{self.expert} reads {self.inputs}, got {sorted(tensors)}"
        n = len(next(iter(tensors.values())))
        side = self.model.preprocessing.image_size
        pixels = tensors.get(PIXELS, np.zeros((n, side, side, 3), np.uint8))
        execution = BatchExecution(
            self.model,
            self._runners.__getitem__,
            {name: value for name, value in tensors.items() if name != WANTS},
            lambda _source, rows: self._normalize(pixels[rows]),
            self.attributions,
        )
        wants = np.asarray(tensors[WANTS])
        logits, _ = execution.run({self.expert: np.arange(n)}, {self.expert: wants} if wants.any() else None)
        out = np.full((n, 5, logits[self.expert].shape[1]), np.nan, np.float32)
        out[:, LOGITS] = logits[self.expert]
        for how, where in ((HEAD, HEAD_PAIR), (EXACT, EXACT_PAIR)):
            for row, pair in execution.coalitions.get(self.expert, {}).get(how, {}).items():
                out[row, where] = pair
        returned = {OUTPUTS: out}
        produced = execution.produced.get(MAP_TENSOR) if self.sends_map else None
        if produced is not None:
            rows, values = produced
            image_map = np.full((n, *values.shape[1:]), np.nan, np.float32)
            image_map[rows] = values
            returned[MAP_TENSOR] = image_map
        return returned

    def _normalize(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The model's own normalized image (experts with their own preprocessing specs do not run on Ray yet)."""
        return {"image": self.model.preprocessing.normalize(pixels)}

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """One run per batch size on random inputs, so the first request pays no start-up cost."""
        rng = np.random.default_rng(0)
        for batch_size in batch_sizes:
            self.run({name: _random(self.model, name, batch_size, rng) for name in self.inputs})


def _random(model: StoredModel, name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == PIXELS:
        side = model.preprocessing.image_size
        return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    if name == WANTS:  # the warm-up asks for all attribution can compute (only what the expert has is run)
        return np.full(n, WANT_HEAD | WANT_EXACT, np.int64)
    if name == "token_ids":
        return rng.integers(2, model.tokenizer.vocab_size, (n, model.tokenizer.max_tokens)).astype(np.int64)
    shapes = {t.name: t.shape[1:] for info in model.components.values() for t in info.outputs}
    return rng.standard_normal((n, *shapes[name])).astype(np.float32)


def concatenate(sub_batches: list[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Sub-batches of one expert as one batch, and the rows each brought (to split the logits back)."""
    sizes = [len(next(iter(b.values()))) for b in sub_batches]
    joined = {name: np.concatenate([b[name] for b in sub_batches]) for name in sub_batches[0]}
    return joined, sizes


def split(returned: Mapping[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """What ``ExpertWorker.run`` returned for joined sub-batches, back as one return per sub-batch."""
    for name, values in returned.items():
        assert len(values) == sum(sizes), f"{len(values)} rows of {name} for sub-batches of {sizes}"
    cuts = np.cumsum(sizes)[:-1]
    parts = {name: np.split(values, cuts) for name, values in returned.items()}
    return [{name: parts[name][k] for name in parts} for k in range(len(sizes))]


class VersionMismatch(RuntimeError):
    """An expert replica was asked to finish a request that another model version routed."""


class RemoteExecution:
    """``BatchExecution``'s ``run(members)``, with each expert's sub-batch sent to its deployment. The calls of
    one batch go out together and run at once on their replicas."""

    def __init__(
        self,
        model: StoredModel,
        handles: Mapping[str, Any],
        tensors: dict[str, np.ndarray],
        pixels: np.ndarray,
        timeout_s: float,
    ):
        self.model = model
        self.handles = handles
        self.tensors = tensors
        self.pixels = pixels
        self.timeout_s = timeout_s
        self.failed: dict[str, ApiError] = {}  # expert -> why its deployment did not answer this batch
        self.coalitions: dict[str, dict[str, dict[int, np.ndarray]]] = {}  # as BatchExecution's
        # As BatchExecution's, for the image encoder's map only (the experts send it back: ExpertWorker.run).
        self.produced: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def run(
        self, members: Mapping[str, np.ndarray], wants: Mapping[str, np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Each expert's logits for its rows, and the coalition logits ``wants`` asks for (kept in ``coalitions``).
        An expert deployment that cannot answer fails only its own rows: its logits are zeros and its error is kept
        in ``failed`` (RemoteExpertsPipeline answers those requests with it); when every expert of the call failed,
        the call raises the first error."""
        model, version = self.model.name, self.model.version
        wants = wants or {}
        calls = {
            expert: self.handles[expert].run.remote(self._sub_batch(expert, rows, wants.get(expert)), model, version)
            for expert, rows in members.items()
        }
        returned, errors = {}, {}
        for expert, call in calls.items():
            try:
                returned[expert] = self._result(expert, call)
            except (NotReady, DeadlineExceeded) as error:
                errors[expert] = error
                outputs = np.full((len(members[expert]), 5, len(self.model.labels)), np.nan, np.float32)
                outputs[:, LOGITS] = 0.0
                returned[expert] = {OUTPUTS: outputs}
        if errors and len(errors) == len(calls):
            raise next(iter(errors.values()))
        self.failed.update(errors)
        logits = {}
        for expert, rows in members.items():
            out = returned[expert][OUTPUTS]
            assert out.shape[0] == len(rows), f"{expert}: {out.shape[0]} rows for {len(rows)}"
            self._keep_map(np.asarray(rows), returned[expert].get(MAP_TENSOR))
            logits[expert] = out[:, LOGITS]
            kept = self.coalitions.setdefault(expert, {HEAD: {}, EXACT: {}})
            for how, where in ((HEAD, HEAD_PAIR), (EXACT, EXACT_PAIR)):
                asked = ~np.isnan(out[:, where]).any(axis=(1, 2))
                kept[how].update(zip(np.asarray(rows)[asked].tolist(), out[asked, where], strict=True))
        # Each expert replica records its own time on its batches (dynfuse_expert_duration_seconds), where it
        # is measured without the trip; the ingress adds none.
        return logits, {}

    def _keep_map(self, rows: np.ndarray, image_map: np.ndarray | None) -> None:
        """The rows of ``image_map`` an expert's chain produced, merged into ``produced`` as BatchExecution merges
        a later pass's (a row's map is the same whichever chain ran the encoder)."""
        if image_map is None:
            return
        ran = ~np.isnan(image_map.reshape(len(image_map), -1)).any(axis=1)
        if not ran.any():
            return
        rows, values = rows[ran], image_map[ran]
        if MAP_TENSOR in self.produced:
            old_rows, old_values = self.produced[MAP_TENSOR]
            new = ~np.isin(rows, old_rows)
            rows, values = np.concatenate([old_rows, rows[new]]), np.concatenate([old_values, values[new]])
        order = np.argsort(rows, kind="stable")
        self.produced[MAP_TENSOR] = (rows[order], values[order])

    def _sub_batch(self, expert: str, rows: np.ndarray, wants: np.ndarray | None) -> dict[str, np.ndarray]:
        tensors = {
            name: self.pixels[rows] if name == PIXELS else self.tensors[name][rows]
            for name in wire_names(self.model, expert)
            if name != WANTS
        }
        return tensors | {WANTS: np.zeros(len(rows), np.int64) if wants is None else np.asarray(wants, np.int64)}

    def _result(self, expert: str, call) -> np.ndarray:
        started = time.monotonic()
        try:
            return call.result(timeout_s=self.timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"expert {expert!r} did not answer within {time.monotonic() - started:.1f} s; retry later"
            ) from None
        except Exception as error:
            if _is_unavailable(error):
                raise NotReady(
                    f"expert {expert!r} has no replica able to answer now ({type(error).__name__}); retry shortly",
                    EXPERT_RETRY_AFTER_S,
                ) from error
            raise


def _is_unavailable(error: BaseException) -> bool:
    """A replica died, is restarting or refuses more work: the cluster's state, not the request's fault. Known by
    name, so that this module needs no Ray import (RayActorError, ActorDiedError, ActorUnavailableError,
    BackPressureError, DeploymentUnavailableError, RequestCancelledError); and an expert replica of another
    version (a redeploy under way)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(
        names
        & {
            "RayActorError",
            "ActorDiedError",
            "ActorUnavailableError",
            "BackPressureError",
            "DeploymentUnavailableError",
            "RequestCancelledError",
            "VersionMismatch",
        }
    )


class RemoteExpertsPipeline(DynamicPipeline):
    """The dynamic pipeline of the ingress: encoders, router and policy here, the experts in their deployments.

    Built only over expert deployments that hold this very version (each is asked first), so the answers never
    mix versions; ``on_close`` releases them when the version stops serving (service/ray/versions.py)."""

    def __init__(
        self,
        model: StoredModel,
        backend: Backend,
        handles: Mapping[str, Any],
        timeout_s: float,
        on_close: Callable[[], None] | None = None,
    ):
        missing = set(model.expert_names) - set(handles)
        assert not missing, f"no deployment for the experts {sorted(missing)}"
        self.handles = handles
        self.timeout_s = timeout_s
        self.on_close = on_close
        self._warm = False
        self._executions = threading.local()  # the execution of the predict call running on this thread
        self._check_versions(model)
        super().__init__(model, backend)

    def _check_versions(self, model: StoredModel) -> None:
        calls = {expert: self.handles[expert].describe.remote() for expert in model.expert_names}
        for expert, call in calls.items():
            held = call.result(timeout_s=READY_TIMEOUT_S)
            wanted = {"model": model.name, "version": model.version, "expert": expert}
            if {key: held.get(key) for key in wanted} != wanted:
                raise VersionMismatch(f"the deployment for expert {expert} of {wanted} holds {held}")

    def served_components(self) -> set[str]:
        return set(self.model.shared_encoders.values()) | {self.model.router}  # attribution heads run with experts

    def execution(self, tensors: dict[str, np.ndarray], pixels: np.ndarray, inputs=None) -> RemoteExecution:
        execution = RemoteExecution(self.model, self.handles, tensors, pixels, self.timeout_s)
        self._executions.current = execution
        return execution

    def predict(self, inputs: list[PipelineInput]) -> tuple[list[PipelineOutput | ApiError], dict[str, float]]:
        """The pipeline's outputs, where a request that needed an expert whose deployment did not answer gets
        that error instead (the batcher answers it alone: the requests of the batch on other experts are served)."""
        self._executions.current = None
        outputs, seconds = super().predict(inputs)
        execution = self._executions.current
        failed = execution.failed if execution is not None else {}
        if not failed:
            return outputs, seconds
        first = next(iter(failed.values()))

        def error_of(output: PipelineOutput) -> ApiError | None:
            if output.expert == SOFT:  # it ran every expert it may use: any of them may be the one down
                return first
            return failed.get(output.expert) or (failed.get(output.fallback_from) if output.fallback_from else None)

        return [error_of(output) or output for output in outputs], seconds

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """Once: the ingress warms the pipeline as soon as it is built, to release the experts if that fails."""
        if not self._warm:
            super().warmup(batch_sizes)
            self._warm = True

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
