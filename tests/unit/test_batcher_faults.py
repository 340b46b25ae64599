"""What the micro-batcher does, logs and answers in each fault an operator may meet: where the pipeline runs (one named
thread, never two calls at once), the log line of each failure, the errors callers get when the worker ends or
stop's grace runs out, how batches form, and the deadlines and timings each answer carries (its health:
tests/unit/test_batcher_health.py). The faults are made on purpose with the fake
pipelines of tests/unit/test_batcher.py; written against the mutants of service/batcher.py that survived the
other tests (tests/mutation/EQUIVALENT.md lists those that cannot be told apart)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from test_batcher import POISON, FakePipeline, batcher, failed, item, run, until

import service.batcher as batcher_module
from service.batcher import UNHEALTHY_AFTER, MicroBatcher
from service.errors import DeadlineExceeded, NotReady
from service.metrics import Metrics


class Job:
    """A spare job (service/batcher.py SpareJob) that records what it was told."""

    def __init__(self, route: str = "audit", raise_in_callback: bool = False):
        self.items = [item(route)]
        self.outcome: str | None = None
        self.raise_in_callback = raise_in_callback
        self.done = asyncio.Event()

    def _record(self, outcome: str) -> None:
        self.outcome = outcome
        self.done.set()
        if self.raise_in_callback:
            raise RuntimeError("a bug in the job's callback")

    def finished(self, outputs):
        self._record(f"finished:{outputs[0].label}")

    def failed(self, error):
        self._record(f"failed:{error!r}")

    def dropped(self):
        self._record("dropped")


class ThreadRecordingPipeline(FakePipeline):
    """Records the thread of every call, and how many calls ran at once at most."""

    def __init__(self):
        super().__init__()
        self.threads: set[str] = set()
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def predict(self, items):
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.threads.add(threading.current_thread().name)
        try:
            return super().predict(items)
        finally:
            with self._lock:
                self.inside -= 1


def messages(caplog, level=logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def logged_with_traceback(caplog, message: str) -> bool:
    return any(r.getMessage() == message and r.exc_info and r.exc_info[1] is not None for r in caplog.records)


# -- where the pipeline runs -----------------------------------------------------------------------------------------
def test_every_pipeline_call_runs_on_the_batchers_one_named_thread_and_the_worker_task_is_named():
    pipeline = ThreadRecordingPipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=2, probe=lambda: [item()])
        b.start()
        names = {task.get_name() for task in asyncio.all_tasks()}
        await b.submit([item()])  # a batch
        await asyncio.gather(b.submit([item()]), b.submit([item(POISON)]), return_exceptions=True)  # one by one
        for _ in range(UNHEALTHY_AFTER):
            await failed(b, POISON)  # the third makes the probe run (it passes)
        job = Job()
        b.offer_spare(job)  # spare work
        await job.done.wait()
        await b.stop()
        return names

    names = run(scenario)
    assert "dynfuse-batcher" in names
    assert pipeline.threads == {"dynfuse-batch_0"}


def test_a_new_worker_never_runs_a_second_call_beside_a_stuck_one():
    """The worker task replaced while its call still runs in the thread: the new worker's call waits for it (two
    calls at once would only fight over the cores)."""
    pipeline = ThreadRecordingPipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1)
        b.start()
        first = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        b._worker.cancel()  # the supervisor starts a new worker after its back-off
        second = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: b.restarts == 1 and b._batch_started is not None)  # the new worker has handed it on
        deadline = time.monotonic() + 0.5  # room for a second thread to enter, were there one
        while pipeline.entered < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        entered_while_held = pipeline.entered
        pipeline.gate.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        await b.stop()
        return entered_while_held, results

    entered_while_held, (first, second) = run(scenario)
    assert entered_while_held == 1
    assert pipeline.most_inside == 1
    assert str(first) == "the batch worker ended (None)"  # a cancelled task ends without an exception
    assert second[0].output.label == "call2"


# -- the log line of each failure, and what the caller gets ----------------------------------------------------------
def test_a_failed_batch_is_logged_then_run_one_by_one_and_each_failure_logged(caplog):
    pipeline = FakePipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=2)
        b.start()
        answers = await asyncio.gather(b.submit([item()]), b.submit([item(POISON)]), return_exceptions=True)
        running = b.running
        lone = await failed(b, POISON)
        await b.stop()
        return answers, running, lone

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        (good, bad), running, lone = run(scenario)
    assert pipeline.calls == [2, 1, 1, 1]
    assert good[0].output.label == "call2"
    assert str(bad) == "the pipeline failed on this input (ValueError('this input breaks the pipeline'))"
    assert running is True  # nothing left marked as running after the one-by-one pass
    assert logged_with_traceback(caplog, "the pipeline failed on a batch of 2; running its items one by one")
    assert logged_with_traceback(caplog, "the pipeline failed on one item of a failed batch")
    assert str(lone) == "the pipeline failed on this input"
    assert logged_with_traceback(caplog, "the pipeline failed on one item")


def test_a_refused_batch_and_failing_bookkeeping_are_logged(caplog):
    class Refusing(FakePipeline):
        def predict(self, items):
            if any(i.route == "refuse" for i in items):
                raise NotReady("expert 'mi2p' has no replica able to answer now")
            return super().predict(items)

    metrics = Metrics("m")
    metrics.observe_batch = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug in the metrics"))

    def taken(_queued):
        raise RuntimeError("a bug in on_batch_taken")

    async def scenario():
        b = batcher(Refusing(), metrics, on_batch_taken=taken)
        b.start()
        refused = await failed(b, "refuse")
        answered = await b.submit([item()])
        await b.stop()
        return refused, answered

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        refused, answered = run(scenario)
    assert isinstance(refused, NotReady)
    assert answered[0].output.label == "call1"
    assert "the pipeline refused a batch of 1: expert 'mi2p' has no replica able to answer now" in messages(caplog)
    assert logged_with_traceback(caplog, "could not record a batch's metrics")
    assert logged_with_traceback(caplog, "on_batch_taken failed")


def test_spare_work_failures_and_a_failing_callback_are_logged_and_the_worker_goes_on(caplog):
    async def scenario():
        b = batcher(FakePipeline())
        b.start()
        broken = Job(POISON)
        b.offer_spare(broken)
        await broken.done.wait()
        careless = Job(raise_in_callback=True)
        b.offer_spare(careless)
        await careless.done.wait()
        answer = await b.submit([item()])
        await b.stop()
        return broken, careless, answer

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        broken, careless, answer = run(scenario)
    assert broken.outcome == "failed:ValueError('this input breaks the pipeline')"
    assert "spare work failed: ValueError('this input breaks the pipeline')" in messages(caplog, logging.WARNING)
    assert careless.outcome == "finished:call2"  # the failed job was the first call
    assert logged_with_traceback(caplog, "a spare job's callback failed")
    assert answer[0].output.label == "call3"


def test_an_iteration_that_fails_answers_its_requests_with_the_error_and_the_loop_goes_on(caplog):
    async def scenario():
        b = batcher(FakePipeline())
        real = b._process
        bug = RuntimeError("a bug in one iteration")

        async def breaks_once(batch):
            b._process = real
            raise bug

        b._process = breaks_once
        b.start()
        error = await failed(b)
        answer = await b.submit([item()])
        await b.stop()
        return error, bug, answer, b.restarts

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        error, bug, answer, restarts = run(scenario)
    assert error is bug
    assert logged_with_traceback(caplog, "the batch worker failed an iteration; answering its requests and going on")
    assert answer[0].output.label == "call1"
    assert restarts == 0  # the loop went on: no new worker was needed


class Fatal(BaseException):
    """Not an Exception: it ends the worker task (what no iteration's handler catches)."""


def test_a_worker_that_ends_with_an_error_fails_its_requests_with_it_and_each_end_is_counted(caplog):
    async def scenario():
        b = batcher(FakePipeline())
        real = b._process

        async def ends_the_worker(batch):
            b._process = real
            raise Fatal("the worker's own bug")

        b.start()
        errors = []
        for ended in (1, 2):
            b._process = ends_the_worker
            errors.append(await failed(b))
            await until(lambda ended=ended: b.restarts == ended and b.running)
        answer = await b.submit([item()])
        await b.stop()
        return errors, answer, b.restarts

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        errors, answer, restarts = run(scenario)
    assert [str(e) for e in errors] == ['the batch worker ended (Fatal("the worker\'s own bug"))'] * 2
    assert restarts == 2
    assert answer[0].output.label == "call1"
    ends = [r for r in caplog.records if r.getMessage().startswith("the batch worker ended")]
    assert [r.getMessage() for r in ends] == [
        'the batch worker ended (Fatal("the worker\'s own bug")); starting a new one in 0.05 s',
        'the batch worker ended (Fatal("the worker\'s own bug")); starting a new one in 0.20 s',
    ]
    assert all(isinstance(r.exc_info[1], Fatal) for r in ends)


def test_stop_past_its_grace_answers_everything_it_held_with_503_and_says_so(caplog):
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1, retry_after_s=7)
        b.start()
        accepted = [asyncio.ensure_future(b.submit([item()])) for _ in range(3)]
        await until(lambda: pipeline.entered == 1 and b.queued == 2)  # one held in predict, two behind it
        await b.stop(grace_s=1.0)
        results = await asyncio.gather(*accepted, return_exceptions=True)
        pipeline.gate.set()
        return results

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        results = run(scenario)
    assert [type(r) for r in results] == [NotReady] * 3, results  # the held one too: the worker was stopped
    assert {r.message for r in results} == {"the server is shutting down; retry on another replica"}
    assert all(r.headers == {"Retry-After": "7"} for r in results)
    assert "the batch worker did not finish within 1 s; answering the rest with 503" in messages(caplog)


def test_stop_before_start_refuses_calls():
    async def scenario():
        b = batcher(FakePipeline())
        await b.stop()
        return await failed(b)

    error = run(scenario)
    assert isinstance(error, NotReady)
    assert error.message == "the server is shutting down; retry on another replica"


# -- forming batches -------------------------------------------------------------------------------------------------
def test_a_batch_waits_its_delay_for_more_requests():
    pipeline = FakePipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=4, max_batch_delay_s=10.0)
        b.start()
        first = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: len(b._in_hand) == 1)  # the worker holds the first, waiting for more
        second = asyncio.ensure_future(b.submit([item(), item(), item()]))
        answers = await first + await second
        await b.stop()
        return answers

    answers = run(scenario)
    assert pipeline.calls == [4]  # closed full, long before the delay
    assert [a.output.label for a in answers] == ["call1"] * 4


def test_spare_work_runs_on_an_idle_batcher_that_has_a_probe():
    async def scenario():
        b = batcher(FakePipeline(), probe=lambda: [item()])
        b.start()
        job = Job()
        b.offer_spare(job)
        await job.done.wait()
        await b.stop()
        return job.outcome

    assert run(scenario) == "finished:call1"


def test_a_full_spare_lane_holds_64_jobs_by_default_and_a_batch_may_run_30_s():
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = MicroBatcher(pipeline, Metrics("m"), max_batch_size=8, max_batch_delay_s=0.01, max_queue=32)
        b.start()
        busy = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        jobs = [Job() for _ in range(65)]
        for job in jobs:
            b.offer_spare(job)
        waiting = b.spare_waiting
        pipeline.gate.set()
        await busy
        await b.stop()
        return jobs, waiting, b.stuck_after_s

    jobs, waiting, stuck_after_s = run(scenario)
    assert waiting == 64
    assert jobs[0].outcome == "dropped"
    assert stuck_after_s == 30.0


# -- deadlines and timings -------------------------------------------------------------------------------------------
def test_a_deadline_already_past_is_refused_at_once_even_when_an_answer_would_come():
    async def scenario():
        b = batcher(FakePipeline())
        b.start()
        with pytest.raises(DeadlineExceeded) as error:
            await b.submit([item()], deadline=time.monotonic() - 1)
        await b.stop()
        return error.value

    error = run(scenario)
    expected = "no answer within the request deadline (1 of 1 item(s) not served); retry later, or with fewer items"
    assert error.message == expected


def test_the_seconds_each_answer_carries_are_durations_in_a_batch_and_one_by_one():
    async def scenario():
        b = batcher(FakePipeline(), max_batch_size=2)
        b.start()
        together = await b.submit([item(), item()])
        apart = await asyncio.gather(b.submit([item()]), b.submit([item(POISON)]), return_exceptions=True)
        await b.stop()
        return together + apart[0]

    for answer in run(scenario):
        assert 0 <= answer.queue_seconds < 60, answer
        assert 0 <= answer.inference_seconds < 60, answer


@pytest.mark.parametrize("one_by_one", [False, True], ids=["in a batch", "one by one"])
def test_a_caller_that_gives_up_mid_batch_leaves_the_others_answered(one_by_one):
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=3, max_batch_delay_s=10.0)
        b.start()
        quitter = asyncio.ensure_future(b.submit([item()]))
        others = [asyncio.ensure_future(b.submit([item(POISON if one_by_one else "auto")])) for _ in range(1)]
        others.append(asyncio.ensure_future(b.submit([item()])))
        await until(lambda: pipeline.entered == 1)  # all three in one batch, held
        quitter.cancel()
        pipeline.gate.set()
        results = await asyncio.gather(*others, return_exceptions=True)
        await b.stop()
        return results

    first, last = run(scenario)
    if one_by_one:
        assert isinstance(first, RuntimeError)
    else:
        assert first[0].output.label == "call1"
    assert last[0].output.label.startswith("call")


def test_stop_waits_30_s_by_default_for_the_worker(monkeypatch):
    waits: list[float | None] = []
    real_wait = asyncio.wait

    async def recording_wait(tasks, *args, timeout=None, **kwargs):
        waits.append(timeout)
        return await real_wait(tasks, *args, timeout=timeout, **kwargs)

    async def scenario():
        b = batcher(FakePipeline())
        b.start()
        await b.submit([item()])
        monkeypatch.setattr(batcher_module.asyncio, "wait", recording_wait)
        await b.stop()

    run(scenario)
    assert waits == [30.0]


def test_a_batch_whose_delay_has_passed_when_the_queue_is_looked_at_closes_with_what_it_holds(monkeypatch):
    ticks = iter(range(0, 10**6, 10))  # a clock that moves 10 s between reads: every delay has passed
    fake_time = SimpleNamespace(perf_counter=lambda: float(next(ticks)), monotonic=time.monotonic)
    pipeline = FakePipeline()

    async def scenario():
        b = batcher(pipeline, max_batch_size=4, max_batch_delay_s=1.0)
        b.start()
        monkeypatch.setattr(batcher_module, "time", fake_time)
        answer = await b.submit([item()])
        monkeypatch.undo()
        await b.stop()
        return answer

    assert run(scenario)[0].output.label == "call1"
    assert pipeline.calls == [1]


def test_stop_past_its_grace_cancels_a_call_queued_behind_a_stuck_one():
    """A replaced worker's call waits in the thread's queue behind the stuck call; stop drops it: the pipeline never
    runs a call whose caller was already answered 503."""
    pipeline = FakePipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_batch_size=1)
        b.start()
        first = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: pipeline.entered == 1)
        b._worker.cancel()
        second = asyncio.ensure_future(b.submit([item()]))
        await until(lambda: b.restarts == 1 and b._batch_started is not None)  # queued behind the stuck call
        await b.stop(grace_s=0.1)
        results = await asyncio.gather(first, second, return_exceptions=True)
        pipeline.gate.set()
        await until(lambda: len(pipeline.calls) == 1)  # the stuck call ends
        deadline = time.monotonic() + 0.5  # room for a queued call to run, were it left there
        while pipeline.entered < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return results

    first, second = run(scenario)
    assert isinstance(second, NotReady)
    assert pipeline.entered == 1
