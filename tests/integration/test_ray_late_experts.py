"""The Ray engine's ingress when one expert deployment cannot answer: each expert's rows complete on their own.

service/ray/'s two halves without a cluster: the ingress's RemoteExpertsPipeline sends each expert's sub-batch to
an ExpertWorker of the shipped model through a stand-in handle whose calls can be held (a replica being replaced:
the call waits for it) or made to fail as Ray's do (a replica that died). The reference is a healthy run of the
same pipeline on the same batch (bit for bit), and the single-process pipeline (to 1e-5), not the code under test.
tests/integration/test_ray_engine.py kills a real replica on a real cluster.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image

from export.backends import create_backend
from export.pipeline import DynamicPipeline, PipelineOutput
from export.store import load_model
from service.batcher import MicroBatcher
from service.errors import DeadlineExceeded, NotReady
from service.metrics import Metrics
from service.ray.experts import ExpertWorker, RemoteExpertsPipeline

HOLD_S = 0.3
TEXT_ROWS, IMAGE_ROWS = (0, 2, 3, 5), (1, 4)  # the batch's rows forced to each expert
ROUTES = ["image" if i in IMAGE_ROWS else "text" for i in range(6)]


class ActorDiedError(RuntimeError):
    """Ray's error for a call whose replica died (known by its name: service/ray/experts.py imports no Ray)."""


class Call:
    """A Serve response: computed when asked for, after ``gate`` opens (at most ``timeout_s``, as Serve's)."""

    def __init__(self, compute, gate: threading.Event | None, error: BaseException | None):
        self.compute, self.gate, self.error = compute, gate, error

    def result(self, timeout_s):
        if self.gate is not None and not self.gate.wait(timeout_s):
            raise TimeoutError(f"no answer within {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.compute()


class Handle:
    def __init__(self, model, worker: ExpertWorker):
        self.model, self.worker = model, worker
        self.run = self
        self.describe = self
        self.gate: threading.Event | None = None  # while set to a closed event, calls wait for it
        self.error: BaseException | None = None
        self.calls = 0

    def remote(self, *args):
        if not args:  # describe
            return Call(lambda: {"model": self.model.name, "version": self.model.version, "expert": self.worker.expert},
                        None, None)  # fmt: skip
        self.calls += 1
        sub_batch = args[0]
        return Call(lambda: self.worker.run(sub_batch), self.gate, self.error)


@pytest.fixture(scope="module")
def parts(tiny_store):
    model = load_model(tiny_store)
    backend = create_backend("onnx", "cpu")
    workers = {e: ExpertWorker(model, backend, e) for e in model.expert_names}
    return model, backend, workers


@pytest.fixture
def handles(parts):
    model, _, workers = parts
    return {e: Handle(model, w) for e, w in workers.items()}


def make_pipeline(parts, handles, timeout_s=30.0, hold_s=HOLD_S) -> RemoteExpertsPipeline:
    model, backend, _ = parts
    return RemoteExpertsPipeline(model, backend, handles, timeout_s=timeout_s, hold_s=hold_s)


def batch(pipeline, samples, routes=ROUTES):
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples[: len(routes)]]
    return [pipeline.prepare(s["text"], image, route=route)
            for s, image, route in zip(samples, images, routes, strict=False)]  # fmt: skip


def assert_identical(mine: PipelineOutput, theirs: PipelineOutput) -> None:
    assert (mine.label, mine.expert, mine.madds, mine.decided_by) == (
        theirs.label,
        theirs.expert,
        theirs.madds,
        theirs.decided_by,
    )
    assert np.array_equal(mine.probabilities, theirs.probabilities)
    assert np.array_equal(mine.importance, theirs.importance)
    assert (mine.confidence, mine.ood_pvalue) == (theirs.confidence, theirs.ood_pvalue)


def test_the_rows_of_healthy_experts_are_answered_while_a_held_expert_s_wait_and_then_get_the_same_answers(
    parts, handles, samples
):  # fmt: skip
    model, backend, _ = parts
    pipeline = make_pipeline(parts, handles)
    inputs = batch(pipeline, samples)
    healthy, _ = pipeline.predict(inputs)  # every expert answers: no row waits
    assert all(isinstance(o, PipelineOutput) for o in healthy)
    local, _ = DynamicPipeline(model, backend).predict(inputs)  # the single process, the engine's reference
    for mine, theirs in zip(healthy, local, strict=True):
        assert (mine.label, mine.expert) == (theirs.label, theirs.expert)
        np.testing.assert_allclose(mine.probabilities, theirs.probabilities, atol=1e-5)

    handles["image"].gate = gate = threading.Event()  # the image expert's replica is being replaced
    calls_before = {e: h.calls for e, h in handles.items()}
    started = time.monotonic()
    outputs, _ = pipeline.predict(inputs)
    took = time.monotonic() - started
    assert took < HOLD_S + 5, f"the batch held its healthy rows {took:.1f} s"
    for i in TEXT_ROWS:  # answered now, with the answers of the healthy run
        assert isinstance(outputs[i], PipelineOutput), (i, outputs[i])
        assert_identical(outputs[i], healthy[i])
    late = {i: outputs[i] for i in IMAGE_ROWS}
    assert all(isinstance(f, Future) and not f.done() for f in late.values()), late
    gate.set()  # the replacement runs: the held call answers
    for i, future in late.items():
        assert_identical(future.result(timeout=60), healthy[i])
    # Nothing was sent twice: one call per expert of the batch (the second pass reused them).
    sent = {e: h.calls - calls_before[e] for e, h in handles.items() if h.calls > calls_before[e]}
    assert sent == {"text": 1, "image": 1}, sent
    pipeline.close()


def test_a_held_expert_s_rows_get_a_deadline_error_naming_it_and_the_others_their_answers(parts, handles, samples):
    pipeline = make_pipeline(parts, handles, timeout_s=1.5)
    inputs = batch(pipeline, samples)
    healthy, _ = pipeline.predict(inputs)
    handles["image"].gate = threading.Event()  # never opens
    outputs, _ = pipeline.predict(inputs)
    for i in TEXT_ROWS:
        assert_identical(outputs[i], healthy[i])
    for i in IMAGE_ROWS:
        with pytest.raises(DeadlineExceeded, match="expert 'image' did not answer within"):
            outputs[i].result(timeout=30)
    pipeline.close()


def test_a_dead_replica_fails_only_its_own_rows_at_once(parts, handles, samples):
    pipeline = make_pipeline(parts, handles)
    inputs = batch(pipeline, samples)
    healthy, _ = pipeline.predict(inputs)
    handles["image"].error = ActorDiedError("The actor died unexpectedly before finishing this task.")
    outputs, _ = pipeline.predict(inputs)
    for i in TEXT_ROWS:
        assert_identical(outputs[i], healthy[i])
    for i in IMAGE_ROWS:
        assert isinstance(outputs[i], NotReady), outputs[i]
        assert "expert 'image' has no replica able to answer now (ActorDiedError)" in str(outputs[i])
        assert outputs[i].headers["Retry-After"] == "1"
    # Every expert of a batch failed: each row gets the error (the batcher answers them, 503 with Retry-After).
    only_image = batch(pipeline, samples, routes=["image"] * 3)
    outputs, _ = pipeline.predict(only_image)
    assert all(isinstance(o, NotReady) for o in outputs), outputs
    pipeline.close()


def test_through_the_batcher_the_healthy_rows_are_answered_before_the_held_expert_answers(parts, handles, samples):
    """The batcher answers each row as its output settles, and takes the next batch meanwhile: requests to the
    healthy expert sent after the held batch are answered too, before the held expert's."""
    pipeline = make_pipeline(parts, handles)
    inputs = batch(pipeline, samples)
    healthy, _ = pipeline.predict(inputs)
    handles["image"].gate = gate = threading.Event()

    async def scenario():
        batcher = MicroBatcher(pipeline, Metrics("m"), max_batch_size=16, max_batch_delay_s=0.05, max_queue=64)
        batcher.start()
        try:
            deadline = time.monotonic() + 120
            tasks = [asyncio.ensure_future(batcher.submit([item], deadline)) for item in inputs]
            text_done = [tasks[i] for i in TEXT_ROWS]
            done, _ = await asyncio.wait(text_done, timeout=60)
            assert len(done) == len(TEXT_ROWS)
            assert not any(tasks[i].done() for i in IMAGE_ROWS), "the held expert's rows were answered"
            later = await asyncio.wait_for(batcher.submit([inputs[TEXT_ROWS[0]]], deadline), 60)  # the next batch
            assert not any(tasks[i].done() for i in IMAGE_ROWS)
            gate.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return results, later
        finally:
            gate.set()
            await batcher.stop(grace_s=30)

    results, [later] = asyncio.run(scenario())
    for i, [result] in enumerate(results):
        assert_identical(result.output, healthy[i])
    np.testing.assert_allclose(later.output.probabilities, healthy[TEXT_ROWS[0]].probabilities, atol=1e-5)
    pipeline.close()
