"""The micro-batcher cannot wedge: a supervised loop, deadlines, per-item failures, a stop that answers
everything it accepted, and a queue bound that cannot refuse a valid call forever. A fake pipeline
makes each fault happen on purpose."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from export.pipeline import PipelineInput, PipelineOutput
from service.batcher import UNHEALTHY_AFTER, MicroBatcher
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.metrics import Metrics

POISON = "poison"  # a route value the fake pipeline fails on


class FakePipeline:
    """``predict`` answers each input with its position in the whole run; ``fail_when(items)`` may raise,
    and ``gate`` (when set) holds every call until it is released."""

    def __init__(self):
        self.calls: list[int] = []
        self.entered = 0  # calls begun (a held one included)
        self.gate: threading.Event | None = None
        self.wrong_count_once = False

    def predict(self, items):
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.calls.append(len(items))
        if any(item.route == POISON for item in items):
            raise ValueError("this input breaks the pipeline")
        outputs = [output(len(self.calls)) for _ in items]
        if self.wrong_count_once:
            self.wrong_count_once = False
            outputs = outputs[:-1]
        return outputs, {"text": 0.001}


def output(call: int) -> PipelineOutput:
    return PipelineOutput(
        label=f"call{call}",
        probabilities=np.ones(2, np.float32) / 2,
        expert="text",
        decided_by="router",
        route_scores=np.ones(3, np.float32) / 3,
        modality_weights=np.array([1.0, 0.0], np.float32),
        importance=np.array([1.0, 0.0], np.float32),
        madds=1,
        operating_point="lambda_0",
    )


def item(route: str = "auto") -> PipelineInput:
    return PipelineInput(token_ids=np.zeros(4, np.int64), image=None, route=route)


def batcher(pipeline, metrics=None, **overrides) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_batch_delay_s": 0.01, "max_queue": 32} | overrides
    return MicroBatcher(pipeline, metrics or Metrics("m"), **options)


def run(scenario, timeout: float = 20.0):
    """Run an async scenario; a hang fails the test instead of the suite."""

    async def bounded():
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


def test_an_error_in_the_bookkeeping_after_predict_does_not_end_the_loop():
    metrics = Metrics("m")
    calls = {"n": 0}
    real = metrics.observe_batch

    def breaks_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the bookkeeping")
        return real(*args, **kwargs)

    metrics.observe_batch = breaks_once

    async def scenario():
        b = batcher(FakePipeline(), metrics)
        b.start()
        first = await b.submit([item()])
        second = await b.submit([item()])
        running = b.running
        await b.stop()
        return first, second, running

    first, second, running = run(scenario)
    assert first[0].output.label == "call1"  # answered although its bookkeeping failed
    assert second[0].output.label == "call2"
    assert running


def test_a_pipeline_that_returns_too_few_outputs_does_not_end_the_loop():
    pipeline = FakePipeline()
    pipeline.wrong_count_once = True

    async def scenario():
        b = batcher(pipeline)
        b.start()
        first = await b.submit([item(), item()])
        second = await b.submit([item()])
        await b.stop()
        return first, second

    first, second = run(scenario)
    # The short answer is not trusted: the items ran again one by one, then the loop went on.
    assert [r.output.label for r in first] == ["call2", "call3"]
    assert second[0].output.label == "call4"


def test_a_worker_task_that_dies_is_replaced_and_readiness_says_so_meanwhile():
    async def scenario():
        b = batcher(FakePipeline())
        b.start()
        await b.submit([item()])
        b._worker.cancel()  # what any unexpected end of the task looks like to the supervisor
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        during = (b.running, b.status())
        answer = await b.submit([item()])  # queued while the supervisor waits, served by the new worker
        after = b.running
        await b.stop()
        return during, answer, after, b.restarts

    (running, status), answer, after, restarts = run(scenario)
    assert running is False
    assert status.startswith("restarting")
    assert answer[0].output.label == "call2"
    assert after is True
    assert restarts == 1


def test_a_request_past_its_deadline_gets_504_and_its_item_is_skipped():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1)
        b.start()
        blocker = asyncio.ensure_future(b.submit([item()]))  # holds the worker in predict
        await until(lambda: pipeline.entered == 1)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as error:
            await b.submit([item()], deadline=time.monotonic() + 0.2)
        waited = time.monotonic() - started
        pipeline.gate.set()
        await blocker
        await b.stop()
        return waited, error.value

    waited, error = run(scenario)
    assert 0.15 < waited < 5.0  # its deadline (0.2 s), not the held batch's 30 s, with room for a loaded machine
    assert error.status == 504
    assert error.reason == "deadline"
    assert pipeline.calls == [1]  # the expired item never ran


def test_a_failing_item_fails_only_itself():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_delay_s=0.05)
        b.start()
        results = await asyncio.gather(
            b.submit([item()]), b.submit([item(POISON)]), b.submit([item()]), return_exceptions=True
        )
        await b.stop()
        return results

    good, bad, other = run(scenario)
    assert good[0].output.label.startswith("call")
    assert other[0].output.label.startswith("call")
    assert isinstance(bad, RuntimeError)
    assert "failed on this input" in str(bad)


def test_stop_answers_everything_accepted_then_refuses_at_once():
    pipeline = FakePipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=64, max_batch_delay_s=5.0)  # a batch still filling at stop()
        b.start()
        accepted = [asyncio.ensure_future(b.submit([item()])) for _ in range(5)]
        await until(lambda: b.queued == 5)  # all five in the batch still filling
        started = time.monotonic()
        await b.stop()
        stopped_in = time.monotonic() - started
        answers = [await a for a in accepted]
        with pytest.raises(NotReady):
            await b.submit([item()])
        return stopped_in, answers

    stopped_in, answers = run(scenario)
    assert stopped_in < 4.0  # did not wait out the 5 s batch delay
    assert [len(a) for a in answers] == [1] * 5
    assert pipeline.calls == [5]


def test_stop_with_a_wedged_pipeline_answers_503_within_its_grace():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1)
        b.start()
        accepted = [asyncio.ensure_future(b.submit([item()])) for _ in range(3)]
        await until(lambda: pipeline.entered == 1 and b.queued == 2)  # one held in predict, two behind it
        await b.stop(grace_s=0.2)
        results = await asyncio.gather(*accepted, return_exceptions=True)
        pipeline.gate.set()
        return results

    results = run(scenario)
    assert all(isinstance(r, (NotReady, RuntimeError)) for r in results), results
    assert any(isinstance(r, NotReady) for r in results)


def test_a_call_with_more_rows_than_the_queue_holds_is_served():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_size=4, max_queue=4)
        b.start()
        answers = await b.submit([item() for _ in range(10)])
        await b.stop()
        return answers

    assert len(run(scenario)) == 10


def test_a_full_queue_refuses_with_retry_after():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1, max_queue=2, retry_after_s=3)
        b.start()
        running = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        queued = asyncio.ensure_future(b.submit([item(), item()]))  # admitted: the queue was not full
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as error:
            await b.submit([item()])
        pipeline.gate.set()
        await asyncio.gather(running, queued)
        await b.stop()
        return error.value

    error = run(scenario)
    assert error.status == 503
    assert error.headers == {"Retry-After": "3"}


def test_a_batch_running_longer_than_a_request_may_wait_makes_it_not_running():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, stuck_after_s=0.1)
        b.start()
        pending = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        await until(lambda: not b.running)  # the batch has run past stuck_after_s
        stuck = (b.running, b.status())
        pipeline.gate.set()
        await pending
        healthy = b.running
        await b.stop()
        return stuck, healthy

    (running, status), healthy = run(scenario)
    assert running is False
    assert "over 0.1 s" in status
    assert healthy is True


class BrokenPipeline(FakePipeline):
    """A pipeline that fails every call while ``broken`` is set (a lost device), whatever its inputs."""

    def __init__(self):
        super().__init__()
        self.broken = False
        self.probes = 0
        self.attempts = 0

    def predict(self, items):
        self.attempts += 1
        if any(i.route == "probe" for i in items):
            self.probes += 1
        if self.broken:
            raise RuntimeError("CUDA error: device lost")
        return super().predict(items)


async def failed(b: MicroBatcher, route: str = "auto") -> BaseException:
    try:
        await b.submit([item(route)])
    except Exception as error:  # noqa: BLE001 - the failure is what is looked at
        return error
    raise AssertionError("the request was answered")


async def until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_pipeline_that_fails_every_batch_makes_the_batcher_unready_and_it_recovers_by_itself():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        await b.submit([item()])
        pipeline.broken = True
        early = [await failed(b) for _ in range(UNHEALTHY_AFTER - 1)]
        assert b.ready  # two failed batches: could be their inputs
        await failed(b)
        await until(lambda: not b.healthy)
        attempts = pipeline.attempts
        refused = await failed(b)  # refused at once while unhealthy, without running
        ran = pipeline.attempts - attempts
        status = b.status()
        pipeline.broken = False  # the device is back: no request is needed to notice
        await until(lambda: b.ready)
        answer = await b.submit([item()])
        await b.stop()
        return early, refused, ran, status, answer

    early, refused, ran, status, answer = run(scenario)
    assert all(isinstance(e, RuntimeError) for e in early)
    assert isinstance(refused, NotReady)
    assert "device lost" in refused.message
    assert status.startswith(f"the last {UNHEALTHY_AFTER} batches failed for every request")
    assert "CUDA error: device lost" in status
    assert ran == 0
    assert answer[0].output.label.startswith("call")
    assert pipeline.probes >= 2  # one when the failures added up, one (at least) to find it healthy again


def test_bad_inputs_that_fail_every_batch_do_not_make_the_batcher_unready():
    """Poison requests fail, but the probe (a good input) is answered: the pipeline is fine."""
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        errors = [await failed(b, POISON) for _ in range(UNHEALTHY_AFTER * 2)]
        ready = b.ready
        answer = await b.submit([item()])
        await b.stop()
        return errors, ready, answer

    errors, ready, answer = run(scenario)
    assert all(isinstance(e, ValueError | RuntimeError) for e in errors)
    assert ready
    assert pipeline.probes == 2
    assert answer[0].output.label.startswith("call")


def test_without_a_probe_a_successful_batch_ends_the_unhealthy_state():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        unready = (b.ready, b.status())
        pipeline.broken = False
        answer = await b.submit([item()])  # without a probe, requests still run and tell recovery
        ready = b.ready
        await b.stop()
        return unready, answer, ready

    (ready_before, status), answer, ready_after = run(scenario)
    assert ready_before is False
    assert "failed for every request" in status
    assert answer[0].output.label.startswith("call")
    assert ready_after


def test_a_degraded_spell_ends_when_the_queue_drains_not_at_the_next_request():
    """dynfuse_degraded_seconds counts the time the queue was high, not the idle gap after it (service/inference.py
    feeds the controller from both ends: request arrivals and batches leaving the queue)."""
    from service.degrade import DegradeController

    offset = {"s": 0.0}
    seconds: list[float] = []
    degrade = DegradeController(
        "cheap", high_water=4, low_water=0, on_seconds=seconds.append, clock=lambda: time.monotonic() + offset["s"]
    )
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=2, on_batch_taken=degrade.update)
        b.start()
        calls = [asyncio.create_task(b.submit([item()])) for _ in range(8)]
        await until(lambda: pipeline.entered == 1 and b.queued == 6)  # one batch of 2 held, 6 behind it
        assert degrade.update(b.queued)  # a request arriving now sees a high queue: degraded
        started = time.monotonic()
        pipeline.gate.set()
        await asyncio.gather(*calls)
        drained = time.monotonic() - started
        assert not degrade.degraded  # ended by the batches leaving the queue
        offset["s"] += 3600.0  # an hour without a request
        degrade.update(0)  # the next request
        await b.stop()
        return drained

    drained = run(scenario)
    assert 0 < sum(seconds) <= drained + 0.5


def test_refusals_by_the_pipelines_own_state_do_not_make_it_unready():
    """An ApiError from the pipeline (the Ray engine's expert deployment restarting) is answered as it is, 503 with
    Retry-After; it says nothing of the pipeline's health, so any number of them leave the batcher ready."""

    class Restarting(FakePipeline):
        def predict(self, items):
            raise NotReady("expert 'mi2p' has no replica able to answer now; retry shortly")

    probes = []

    async def scenario():
        b = batcher(Restarting(), probe=lambda: probes.append(1) or [item()])
        b.start()
        errors = [await failed(b) for _ in range(UNHEALTHY_AFTER * 3)]
        ready = b.ready
        await b.stop()
        return errors, ready

    errors, ready = run(scenario)
    assert all(isinstance(e, NotReady) for e in errors)
    assert ready
    assert probes == []
