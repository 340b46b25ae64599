"""What the micro-batcher reports and records, state by state: the reason /readyz shows in each state, the back-off
schedule after failures, the log lines an operator reads when the model turns unhealthy and recovers, what each
answer carries (queue and inference seconds, the failing input's error), and the metrics of a batch. The faults
are made on purpose with the fake pipeline of tests/unit/test_batcher.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from test_batcher import POISON, BrokenPipeline, FakePipeline, batcher, failed, item, output, run, until

from service.batcher import RESTART_BACKOFF_S, UNHEALTHY_AFTER
from service.errors import NotReady, Overloaded
from service.metrics import Metrics


def test_the_reason_readiness_shows_in_each_state():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, stuck_after_s=0.05)
        reasons = [b.status()]
        b.start()
        reasons.append(b.status())
        pending = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        await until(lambda: not b.running)
        reasons.append(b.status())
        pipeline.gate.set()
        await pending
        for _ in RESTART_BACKOFF_S:  # four failures in a row: backing off for the longest delay
            b._back_off()
        reasons.append(b.status())
        b._backoff_until = 0.0
        await b.stop()
        reasons.append(b.status())
        return reasons

    assert run(scenario) == [
        "not started",
        "running",
        "one batch has run for over 0.05 s",
        "restarting after 4 consecutive failure(s)",
        "stopping",
    ]


def test_failures_in_a_row_back_off_along_the_schedule_and_a_good_batch_starts_it_over():
    async def scenario():
        b = batcher(FakePipeline())
        b.start()
        delays = [b._back_off() for _ in range(len(RESTART_BACKOFF_S) + 2)]
        waits_ahead = b._backoff_until > time.monotonic() + 1.0  # the last delay (5 s) is still ahead
        b._backoff_until = 0.0
        await b.submit([item()])  # a good iteration of the worker
        again = b._back_off()
        b._backoff_until = 0.0
        await b.stop()
        return delays, waits_ahead, again

    delays, waits_ahead, again = run(scenario)
    assert delays == [0.05, 0.2, 1.0, 5.0, 5.0, 5.0]
    assert waits_ahead
    assert again == 0.05


def test_turning_unhealthy_and_recovering_are_logged_and_readiness_says_why(caplog):
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.ready)  # the third failed batch is answered, then the probe decides
        unhealthy = (b.ready, b.status())
        refused = await failed(b)
        pipeline.broken = False
        await until(lambda: b.ready)
        await b.stop()
        return unhealthy, refused

    with caplog.at_level(logging.WARNING, logger="dynfuse"):
        (ready, status), refused = run(scenario)
    # The probe failed last: its failure is the one named.
    reason = (
        f"the last {UNHEALTHY_AFTER} batches failed for every request (probe: RuntimeError: CUDA error: device lost)"
    )
    assert ready is False
    assert status == reason
    assert isinstance(refused, NotReady)
    assert refused.message == f"the model cannot answer now: {reason}; retry later"
    messages = [r.getMessage() for r in caplog.records]
    assert f"the model is unhealthy: {reason}; probing it until it answers" in messages
    assert "the model answers again (the probe was answered): healthy" in messages


def test_a_failed_probe_is_counted_in_the_reason():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: b._failed_probes >= 1, timeout=30)  # the first probe comes after 1 s
        status, probes = b.status(), b._failed_probes
        await b.stop()
        return status, probes

    status, probes = run(scenario)
    assert status == (
        f"the last {UNHEALTHY_AFTER} batches failed for every request (probe: RuntimeError: CUDA error: device lost)"
        f"; {probes} probe(s) failed since"
    )


def test_a_batch_that_answers_ends_the_unhealthy_state_without_a_probe(caplog):
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline)  # no probe: requests themselves tell recovery
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.ready)
        unhealthy = b.ready
        pipeline.broken = False
        answered = await b.submit([item()])
        healthy = (b.ready, b.status())
        await b.stop()
        return unhealthy, answered, healthy

    with caplog.at_level(logging.WARNING, logger="dynfuse"):
        unhealthy, answered, healthy = run(scenario)
    assert unhealthy is False
    assert answered[0].output.label.startswith("call")
    assert healthy == (True, "running")
    assert "the model answers again (a batch was answered): healthy" in [r.getMessage() for r in caplog.records]


def test_bad_inputs_alone_never_make_the_batcher_unhealthy_while_others_are_answered():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_size=1, probe=lambda: [item()])
        b.start()
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b, POISON)
        await b.submit([item()])  # answered: the count of failed batches starts over
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b, POISON)
        ready = b.ready
        await b.stop()
        return ready

    assert run(scenario) is True


def test_each_answer_carries_its_queue_and_inference_seconds_and_the_batch_is_recorded():
    metrics = Metrics("m")
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, metrics, max_batch_size=2)
        b.start()
        first = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        second = asyncio.ensure_future(b.submit([item(), item()]))  # waits behind the held batch
        await until(lambda: b.queued == 2)
        time.sleep(0.05)  # noqa: ASYNC251 - holds the event loop on purpose: the queued items wait at least this
        pipeline.gate.set()
        answers = await first + await second
        await b.stop()
        return answers

    answers = run(scenario)
    assert [a.output.label for a in answers] == ["call1", "call2", "call2"]
    assert all(a.inference_seconds >= 0 for a in answers)
    assert answers[1].queue_seconds >= 0.05 and answers[2].queue_seconds >= 0.05  # noqa: PT018
    registry = metrics.registry
    assert registry.get_sample_value("dynfuse_batch_size_count", {"model": "m"}) == 2
    assert registry.get_sample_value("dynfuse_batch_size_sum", {"model": "m"}) == 3
    assert registry.get_sample_value("dynfuse_queue_duration_seconds_count", {"model": "m"}) == 3
    assert registry.get_sample_value("dynfuse_expert_duration_seconds_count", {"model": "m", "expert": "text"}) == 2


def test_the_item_that_fails_a_batch_gets_the_pipelines_error_and_the_others_their_answers():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_delay_s=0.2)
        b.start()
        results = await asyncio.gather(
            b.submit([item()]), b.submit([item(POISON)]), b.submit([item()]), return_exceptions=True
        )
        await b.stop()
        return results

    good, bad, other = run(scenario)
    assert str(bad) == "the pipeline failed on this input (ValueError('this input breaks the pipeline'))"
    assert good[0].inference_seconds >= 0 and good[0].queue_seconds >= 0  # noqa: PT018
    assert {good[0].output.label, other[0].output.label} <= {"call2", "call3", "call4"}  # run one by one


def test_a_lone_failing_item_gets_a_plain_error_and_a_wrong_count_fails_the_batch():
    pipeline = FakePipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1)
        b.start()
        lone = await failed(b, POISON)
        pipeline.wrong_count_once = True
        counted = await failed(b)
        await b.stop()
        return lone, counted

    lone, counted = run(scenario)
    assert str(lone) == "the pipeline failed on this input"
    assert str(counted) == "the pipeline failed on this input"
    assert pipeline.calls == [1, 1]


def test_a_full_queue_says_how_full_and_when_to_come_back():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1, max_queue=2)  # the default Retry-After
        b.start()
        running = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        queued = asyncio.ensure_future(b.submit([item(), item()]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as error:
            await b.submit([item()])
        pipeline.gate.set()
        await asyncio.gather(running, queued)
        await b.stop()
        return error.value

    error = run(scenario)
    assert error.message == "the server is at capacity (2 requests queued); retry after 1 s"
    assert error.headers == {"Retry-After": "1"}


def test_after_stop_a_call_is_refused_with_the_reason_and_retry_after():
    async def scenario():
        b = batcher(FakePipeline(), retry_after_s=7)
        b.start()
        await b.stop()
        await b.stop()  # a second stop is a no-op
        with pytest.raises(NotReady) as error:
            await b.submit([item()])
        return error.value

    error = run(scenario)
    assert error.message == "the server is shutting down; retry on another replica"
    assert error.headers == {"Retry-After": "7"}


def test_outputs_in_submission_order_for_a_call_of_many_rows():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_size=3)
        b.start()
        answers = await b.submit([item() for _ in range(7)])
        await b.stop()
        return answers

    answers = run(scenario)
    assert [a.output.label for a in answers] == ["call1"] * 3 + ["call2"] * 3 + ["call3"]
    assert output(1).label == "call1"
