"""Outputs the pipeline settles after its batch (``Deferred``: a Ray expert deployment still computing): the
batcher answers the batch's other items at once, takes the next batch meanwhile, answers a deferred item when it
settles (its value or its error), and a caller whose deadline passes first is told what the item waited for.
Spare work and the health probe do not wait for deferred outputs. tests/integration/test_ray_late_experts.py runs
the same with the Ray engine's pipeline."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_batcher import batcher, item, output, run

from service.batcher import DEFERRED_GIVE_UP_S, Deferred
from service.errors import DeadlineExceeded, NotReady
from service.metrics import Metrics

HELD = "held"  # the route of items the fake pipeline defers


class DeferringPipeline:
    """Items routed HELD get a Deferred (kept in ``held``, settled by the test); the others an output at once,
    labelled with the call that made it."""

    def __init__(self):
        self.calls = 0
        self.held: list[Deferred] = []

    def predict(self, items):
        self.calls += 1
        outputs = []
        for x in items:
            if x.route == HELD:
                self.held.append(Deferred("waiting for the Ray expert deployment(s) 'image'"))
                outputs.append(self.held[-1])
            else:
                outputs.append(output(self.calls))
        return outputs, {}


async def eventually(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def test_the_other_items_and_the_next_batch_are_answered_before_a_deferred_one_which_gets_its_value_later():
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_delay_s=0.05)
        b.start()
        held = asyncio.ensure_future(b.submit([item(HELD)]))
        first = asyncio.ensure_future(b.submit([item()]))
        [answer] = await first
        await eventually(lambda: pipeline.held)
        assert answer.output.label == "call1"
        assert not held.done()
        [after] = await b.submit([item()])  # the next batch runs while the first's deferred item waits
        assert after.output.label == "call2"
        assert not held.done()
        assert b.ready
        pipeline.held[0].set_result(output(99))
        [late] = await held
        await b.stop()
        return answer, after, late

    answer, after, late = run(scenario)
    assert late.output.label == "call99"
    # Counted until it settled (after the next batch ran), not until its batch returned.
    assert late.inference_seconds > answer.inference_seconds + after.inference_seconds


def test_a_deferred_item_that_fails_gets_its_own_error():
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        held = asyncio.ensure_future(b.submit([item(HELD), item()]))
        await eventually(lambda: pipeline.held)
        pipeline.held[0].set_exception(NotReady("expert 'image' has no replica able to answer now", 1))
        with pytest.raises(NotReady, match="expert 'image' has no replica"):
            await held
        await b.stop()

    run(scenario)


def test_a_deferred_item_still_waiting_just_before_its_deadline_is_told_what_it_waited_for():
    """Before the server's own 504 at the deadline (service/admission.py), which cannot say why."""
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        deadline = time.monotonic() + DEFERRED_GIVE_UP_S + 0.3
        with pytest.raises(DeadlineExceeded) as late:
            await b.submit([item(HELD), item()], deadline=deadline)
        left = deadline - time.monotonic()
        pipeline.held[0].set_result(output(1))  # settles after its caller left: nothing to answer
        await asyncio.sleep(0.05)
        await b.stop()
        return str(late.value), left

    message, left = run(scenario)
    assert message == "no answer within the request deadline: waiting for the Ray expert deployment(s) 'image'"
    assert 0 < left <= DEFERRED_GIVE_UP_S


def test_a_batch_of_deferred_items_only_counts_neither_way_for_health():
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        waits = [asyncio.ensure_future(b.submit([item(HELD)])) for _ in range(8)]
        await eventually(lambda: len(pipeline.held) == 8)
        assert b.ready
        for deferred in pipeline.held:
            deferred.set_result(output(7))
        answers = await asyncio.gather(*waits)
        await b.stop()
        return answers

    assert [a.output.label for [a] in run(scenario)] == ["call7"] * 8


class Job:
    def __init__(self, items):
        self.items = items
        self.outcome = None

    def finished(self, outputs):
        self.outcome = ("finished", outputs)

    def failed(self, error):
        self.outcome = ("failed", error)

    def dropped(self):
        self.outcome = ("dropped", None)


def test_spare_work_with_a_deferred_output_fails_at_once_instead_of_waiting():
    pipeline = DeferringPipeline()
    job = Job([item(), item(HELD)])

    async def scenario():
        b = batcher(pipeline)
        b.start()
        b.offer_spare(job)
        await eventually(lambda: job.outcome is not None)
        await b.stop()

    run(scenario)
    kind, error = job.outcome
    assert kind == "failed", job.outcome
    assert isinstance(error, NotReady), job.outcome
    assert "did not answer in time" in str(error)


def test_a_probe_answered_with_an_error_does_not_pass():
    class Refusing:
        def predict(self, items):
            return [NotReady("expert 'image' has no replica able to answer now", 1) for _ in items], {}

    async def scenario():
        from service.batcher import MicroBatcher

        b = MicroBatcher(
            Refusing(), Metrics("m"), max_batch_size=4, max_batch_delay_s=0.01, max_queue=8, probe=lambda: [item()]
        )
        b.start()
        passed = await b._probe_passes()
        await b.stop()
        return passed, b._last_failure

    passed, why = run(scenario)
    assert passed is False
    assert why == "probe: NotReady: expert 'image' has no replica able to answer now"
