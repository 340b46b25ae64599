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
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import numpy as np

from export.attribution import EXACT, HEAD, WANT_EXACT, WANT_HEAD, read_attribution
from export.backends import Backend, Runner
from export.execution import BatchExecution
from export.pipeline import SOFT, DynamicPipeline, PipelineInput, PipelineOutput
from export.store import StoredModel
from models.ood import MAP_TENSOR
from service.batcher import Deferred
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
# The logit of the first label in the rows of an expert that failed or is late: a confident placeholder, so that
# the confidence fallback sends nothing for rows that are answered with an error or later.
PLACEHOLDER_LOGIT = 50.0


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
    one batch go out together, run at once on their replicas, and are waited for together (each in a thread of
    ``waiters``, bounded by ``timeout_s``).

    With ``hold_s``, a call still unanswered that long after the calls went out is *late*: its rows get placeholder
    logits (kept apart in ``late``, with the call still running), so that the batch's other rows are answered
    now; ``RemoteExpertsPipeline`` answers the late rows once the call returns. ``calls`` holds every call made,
    by what it was sent: a second pass over the same batch (the late rows' answers) is given them and sends
    nothing twice, so that its answers are the ones one pass would have given."""

    def __init__(
        self,
        model: StoredModel,
        handles: Mapping[str, Any],
        tensors: dict[str, np.ndarray],
        pixels: np.ndarray,
        timeout_s: float,
        waiters: Executor,
        hold_s: float | None = None,
        calls: dict[tuple, Future] | None = None,
    ):
        self.model = model
        self.handles = handles
        self.tensors = tensors
        self.pixels = pixels
        self.timeout_s = timeout_s
        self.waiters = waiters
        self.hold_s = hold_s
        self.calls: dict[tuple, Future] = {} if calls is None else calls
        self.failed: dict[str, ApiError] = {}  # expert -> why its deployment did not answer this batch
        self.late: dict[str, Future] = {}  # expert -> its call, still running when the batch was answered
        self.coalitions: dict[str, dict[str, dict[int, np.ndarray]]] = {}  # as BatchExecution's
        # As BatchExecution's, for the image encoder's map only (the experts send it back: ExpertWorker.run).
        self.produced: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def run(
        self, members: Mapping[str, np.ndarray], wants: Mapping[str, np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Each expert's logits for its rows, and the coalition logits ``wants`` asks for (kept in ``coalitions``).
        An expert deployment that cannot answer fails only its own rows, and a late one holds back only its own:
        their logits are placeholders (a confident answer, so that no confidence fallback is sent for them), and
        the error or the call is kept in ``failed`` or ``late`` (RemoteExpertsPipeline answers those rows)."""
        wants = wants or {}
        waiting = {expert: self._send(expert, np.asarray(rows), wants.get(expert)) for expert, rows in members.items()}
        if self.hold_s is not None:
            futures_wait(list(waiting.values()), timeout=self.hold_s)
        returned = {}
        for expert, waiter in waiting.items():
            if self.hold_s is not None and not waiter.done():
                self.late[expert] = waiter
                returned[expert] = {OUTPUTS: self._placeholder(len(members[expert]))}
                continue
            try:
                returned[expert] = waiter.result()
            except (NotReady, DeadlineExceeded) as error:
                self.failed.setdefault(expert, error)
                returned[expert] = {OUTPUTS: self._placeholder(len(members[expert]))}
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

    def _placeholder(self, n: int) -> np.ndarray:
        outputs = np.full((n, 5, len(self.model.labels)), np.nan, np.float32)
        outputs[:, LOGITS] = 0.0
        outputs[:, LOGITS, 0] = PLACEHOLDER_LOGIT
        return outputs

    def _send(self, expert: str, rows: np.ndarray, wants: np.ndarray | None) -> Future:
        """The call of ``expert`` on ``rows`` (sent now, or the one a first pass sent), as a future of its result."""
        flags = np.zeros(len(rows), np.int64) if wants is None else np.asarray(wants, np.int64)
        key = (expert, rows.astype(np.int64).tobytes(), flags.tobytes())
        if key not in self.calls:
            sub_batch = self._sub_batch(expert, rows, flags)
            call = self.handles[expert].run.remote(sub_batch, self.model.name, self.model.version)
            self.calls[key] = self.waiters.submit(self._result, expert, call)
        return self.calls[key]

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

    def _sub_batch(self, expert: str, rows: np.ndarray, wants: np.ndarray) -> dict[str, np.ndarray]:
        tensors = {
            name: self.pixels[rows] if name == PIXELS else self.tensors[name][rows]
            for name in wire_names(self.model, expert)
            if name != WANTS
        }
        return tensors | {WANTS: wants}

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

    Each expert's rows complete on their own: a batch waits at most ``hold_s`` for its expert calls, then its rows
    whose experts answered are answered, those of an expert that failed get its error, and those of an expert
    still computing (a replica being replaced, a slow one) get a ``Deferred`` (service/batcher.py) that a background
    thread settles once the call returns, or fails with its error (at most ``timeout_s`` after it was sent): the
    batcher answers each row as it settles, and goes on with the next batch meanwhile. Those rows' answers are the
    ones one pass would have given: the batch goes through the pipeline again with the calls already made (nothing
    is sent twice, and the same front gives the same sub-batches).

    Built only over expert deployments that hold this very version (each is asked first), so the answers never
    mix versions; ``on_close`` releases them when the version stops serving (service/ray/versions.py)."""

    def __init__(
        self,
        model: StoredModel,
        backend: Backend,
        handles: Mapping[str, Any],
        timeout_s: float,
        on_close: Callable[[], None] | None = None,
        hold_s: float | None = None,
    ):
        missing = set(model.expert_names) - set(handles)
        assert not missing, f"no deployment for the experts {sorted(missing)}"
        self.handles = handles
        self.timeout_s = timeout_s
        self.hold_s = hold_s
        self.on_close = on_close
        self._warm = False
        self._strict = False  # while warming: an expert that does not answer fails the warm-up
        self._local = threading.local()  # this thread's pass: its execution, and the calls a first pass made
        # Waiting for the expert calls (each blocks a thread up to timeout_s), and finishing the late rows.
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="dynfuse-expert-call")
        self._finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dynfuse-late-rows")
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
        calls = getattr(self._local, "calls", None)  # a second pass: the first pass's calls, waited for to the end
        hold_s = None if self._strict or calls is not None else self.hold_s
        execution = RemoteExecution(
            self.model, self.handles, tensors, pixels, self.timeout_s, self._waiters, hold_s=hold_s, calls=calls
        )
        self._local.execution = execution
        return execution

    def predict(
        self, inputs: list[PipelineInput]
    ) -> tuple[list[PipelineOutput | ApiError | Deferred], dict[str, float]]:
        """The pipeline's outputs, where a request that needed an expert whose deployment did not answer gets
        that error instead, and one that needs an expert still computing gets a Deferred of its output (the batcher
        answers each alone: the requests of the batch on other experts are served at once)."""
        outputs, seconds, execution = self._one_pass(inputs)
        if self._strict and execution is not None and execution.failed:
            raise next(iter(execution.failed.values()))
        late = execution.late if execution is not None else {}
        rows = [
            i
            for i, output in enumerate(outputs)
            if isinstance(output, PipelineOutput) and self._experts_of(output) & set(late)
        ]
        if not rows:
            return outputs, seconds
        waiting = ", ".join(repr(expert) for expert in sorted(late))
        reason = f"waiting for the Ray expert deployment(s) {waiting}, which did not answer (a replica restarting?)"
        deferred = {i: (Deferred(reason), self._experts_of(outputs[i]) & set(late)) for i in rows}
        for i, (future, _) in deferred.items():
            outputs[i] = future
        logger.warning(
            "expert(s) %s did not answer within %.1f s: %d row(s) of a batch of %d wait for them, the others are "
            "answered", sorted(late), self.hold_s, len(rows), len(inputs),
        )  # fmt: skip
        self._finisher.submit(self._finish_late, inputs, execution.calls, dict(late), deferred)
        return outputs, seconds

    def _one_pass(self, inputs: list[PipelineInput]):
        """The pipeline on ``inputs``, with each output replaced by the error of an expert it needed that failed."""
        self._local.execution = None
        outputs, seconds = super().predict(inputs)
        execution = self._local.execution
        failed = execution.failed if execution is not None else {}
        answered: list = list(outputs)
        for i, output in enumerate(outputs):
            error = next((failed[e] for e in self.experts if e in failed and e in self._experts_of(output)), None)
            if error is not None:
                answered[i] = error
        return answered, seconds, execution

    def _experts_of(self, output: PipelineOutput) -> set[str]:
        """The experts whose logits an output was made from."""
        if output.expert == SOFT:  # the eligible experts it mixed (weight 0: not mixed)
            return {e for e, w in zip(self.experts, output.weights, strict=True) if w > 0}
        return {output.expert} | ({output.fallback_from} if output.fallback_from else set())

    def _finish_late(
        self,
        inputs: list[PipelineInput],
        calls: dict[tuple, Future],
        late: dict[str, Future],
        deferred: dict[int, tuple[Deferred, set[str]]],
    ) -> None:
        """Settle the late rows: once the late calls return (each within timeout_s of being sent), a row whose late
        expert failed gets its error; the others the outputs of the batch run again, given the calls the first pass
        made (this pass waits for the calls it adds, each at most timeout_s)."""
        futures_wait(list(late.values()))
        errors = {expert: waiter.exception() for expert, waiter in late.items() if waiter.exception() is not None}
        again = {}
        for i, (future, experts) in deferred.items():
            error = next((errors[e] for e in sorted(experts) if e in errors), None)
            if error is not None:
                future.set_exception(error)
            else:
                again[i] = future
        if not again:
            return
        self._local.calls = calls
        try:
            outputs, _, _ = self._one_pass(inputs)
        except BaseException as error:  # noqa: BLE001 - handed to the rows' callers
            for future in again.values():
                future.set_exception(error)
            return
        finally:
            self._local.calls = None
        for i, future in again.items():
            if isinstance(outputs[i], ApiError):
                future.set_exception(outputs[i])
            else:
                future.set_result(outputs[i])

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """Once: the ingress warms the pipeline as soon as it is built, to release the experts if that fails (every
        call is waited for, and an expert that cannot answer fails the warm-up)."""
        if not self._warm:
            self._strict = True
            try:
                super().warmup(batch_sizes)
            finally:
                self._strict = False
            self._warm = True

    def close(self) -> None:
        self._finisher.shutdown(wait=False)
        self._waiters.shutdown(wait=False)
        if self.on_close is not None:
            self.on_close()
