"""Outputs the pipeline settles after its batch (``Deferred``: a Ray expert deployment still computing): the
batcher answers the batch's other items at once, takes the next batch meanwhile, answers a deferred item when it
settles (its value or its error, with its batch's queue time and the time until it settled), and a caller whose
deadline passes first is told what the item waited for. A row of a failed batch rerun one by one is answered the
same way; an output settled after the server's loop closed is dropped quietly. Spare work and the health probe do
not wait for deferred outputs. tests/integration/test_ray_late_experts.py runs
the same with the Ray engine's pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future

import pytest
from test_batcher import batcher, item, output, run

from service.batcher import DEFERRED_GIVE_UP_S, Deferred
from service.errors import DeadlineExceeded, NotReady
from service.metrics import Metrics

HELD = "held"  # the route of items the fake pipeline defers


class DeferringPipeline:
    """Items routed HELD get a Deferred (kept in ``held``, settled by the test); the others an output at once,
    labelled with the call that made it."""

    def __init__(self, make=lambda: Deferred("waiting for the Ray expert deployment(s) 'image'")):
        self.calls = 0
        self.held: list[Future] = []
        self.make = make  # what a HELD item gets

    def predict(self, items):
        self.calls += 1
        outputs = []
        for x in items:
            if x.route == HELD:
                self.held.append(self.make())
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


# How long past DEFERRED_GIVE_UP_S the deadline lies when the item is submitted: the give-up is timed from the
# deadline, however near (a give-up a fixed second away would come after a deadline 0.9 s away).
MARGINS_S = {"deadline-1.5-s-away": 1.0, "deadline-0.9-s-away": 0.4}


@pytest.mark.parametrize("margin_s", MARGINS_S.values(), ids=MARGINS_S.keys())
def test_a_deferred_item_still_waiting_just_before_its_deadline_is_told_what_it_waited_for(margin_s):
    """Before the server's own 504 at the deadline (service/admission.py), which cannot say why."""
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        deadline = time.monotonic() + DEFERRED_GIVE_UP_S + margin_s
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
        b = batcher(pipeline, retry_after_s=7)
        b.start()
        b.offer_spare(job)
        await eventually(lambda: job.outcome is not None)
        await b.stop()

    run(scenario)
    kind, error = job.outcome
    assert kind == "failed", job.outcome
    assert isinstance(error, NotReady), job.outcome
    # The 503 a request refused by the batcher gets, with the batcher's Retry-After.
    assert str(error) == "an expert deployment did not answer in time"
    assert error.headers == {"Retry-After": "7"}


def probe_refused_with(message: str) -> tuple[bool, str]:
    """(whether the batcher's probe passed, the failure it kept) when every item is answered NotReady(message)."""

    class Refusing:
        def predict(self, items):
            return [NotReady(message, 1) for _ in items], {}

    async def scenario():
        from service.batcher import MicroBatcher

        b = MicroBatcher(
            Refusing(), Metrics("m"), max_batch_size=4, max_batch_delay_s=0.01, max_queue=8, probe=lambda: [item()]
        )
        b.start()
        passed = await b._probe_passes()
        await b.stop()
        return passed, b._last_failure

    return run(scenario)


def test_a_probe_answered_with_an_error_does_not_pass():
    passed, why = probe_refused_with("expert 'image' has no replica able to answer now")
    assert passed is False
    assert why == "probe: NotReady: expert 'image' has no replica able to answer now"


# A plain concurrent.futures.Future is a deferred output too (``_answer`` takes any Future): it has no reason.
# The deadlines below leave 1 s for the batch to come back before the batcher's own 504 (at the deadline, without
# the reason) would come first: a loaded 2-core machine.
WITHOUT_A_REASON = {"Deferred()": Deferred, "Future()": Future}


@pytest.mark.parametrize("make", WITHOUT_A_REASON.values(), ids=WITHOUT_A_REASON.keys())
def test_a_deferred_output_without_a_reason_still_waiting_near_the_deadline_gets_the_plain_message(make):
    pipeline = DeferringPipeline(make)

    async def scenario():
        b = batcher(pipeline)
        b.start()
        with pytest.raises(DeadlineExceeded) as late:
            await b.submit([item(HELD)], deadline=time.monotonic() + DEFERRED_GIVE_UP_S + 1.0)
        await b.stop()
        return str(late.value)

    assert run(scenario) == "no answer within the request deadline"


@pytest.mark.parametrize("make", WITHOUT_A_REASON.values(), ids=WITHOUT_A_REASON.keys())
def test_a_deferred_output_is_answered_with_its_value_its_batchs_queue_time_and_the_time_until_it_settled(make):
    pipeline = DeferringPipeline(make)

    async def scenario():
        b = batcher(pipeline)
        b.start()
        before = time.perf_counter()
        both = asyncio.ensure_future(b.submit([item(HELD), item()]))  # one call: one enqueue time, one batch
        await eventually(lambda: pipeline.held)
        pipeline.held[0].set_result(output(99))
        late, neighbour = await asyncio.wait_for(both, 10)
        elapsed = time.perf_counter() - before
        await b.stop()
        return late, neighbour, elapsed

    late, neighbour, elapsed = run(scenario)
    assert (late.output.label, neighbour.output.label) == ("call99", "call1")
    assert late.queue_seconds == neighbour.queue_seconds  # enqueued together, their batch started once
    assert neighbour.inference_seconds < late.inference_seconds <= elapsed


def test_a_deferred_output_settled_after_the_servers_loop_closed_is_dropped_quietly(caplog):
    """Nobody waits for it any more (the server stopped): settling it must not raise in, or log from, the thread
    of the pipeline that settles it."""
    pipeline = DeferringPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        asyncio.ensure_future(b.submit([item(HELD)]))  # still waiting when the loop closes
        await eventually(lambda: pipeline.held)
        await b.stop()

    run(scenario)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        pipeline.held[0].set_result(output(1))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class FailingBatches(DeferringPipeline):
    """A batch of more than one item fails (so the batcher reruns its items one by one); one item alone does not."""

    def predict(self, items):
        if len(items) > 1:
            self.calls += 1
            raise RuntimeError("this batch fails")
        return super().predict(items)


def test_a_row_of_a_failed_batch_rerun_one_by_one_is_answered_when_its_deferred_output_settles_and_the_next_at_once():
    pipeline = FailingBatches()

    async def scenario():
        b = batcher(pipeline, max_batch_size=2, max_batch_delay_s=5.0)  # the two calls make one batch
        b.start()
        before = time.perf_counter()
        held = asyncio.ensure_future(b.submit([item(HELD)]))
        other = asyncio.ensure_future(b.submit([item()]))
        [answer] = await asyncio.wait_for(other, 10)  # the row after the deferred one does not wait for it
        assert not held.done()
        pipeline.held[0].set_result(output(99))
        [late] = await asyncio.wait_for(held, 10)
        elapsed = time.perf_counter() - before
        await b.stop()
        return answer, late, elapsed

    answer, late, elapsed = run(scenario)
    # call1: the batch of two (failed); call2: the held row alone (deferred); call3: the other row alone.
    assert (answer.output.label, late.output.label) == ("call3", "call99")
    assert 0 <= late.queue_seconds < elapsed
    assert 0 <= late.inference_seconds < elapsed
    assert late.queue_seconds + late.inference_seconds <= elapsed


def test_the_reason_a_refused_probe_gives_is_cut_at_300_characters():
    message = "expert 'image' has no replica able to answer now; " * 10
    passed, why = probe_refused_with(message)
    assert passed is False
    assert len(why) == 300
    assert why == "probe: NotReady: " + message[: 300 - len("probe: NotReady: ")]
