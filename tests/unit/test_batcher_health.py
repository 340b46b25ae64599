"""How the micro-batcher judges its own health: which failed batches and probes count, the probe's back-off
schedule, how long a reason may be, what callers are told while it is unhealthy, and that a stuck call of any kind
(probe, spare job, one-by-one rerun) makes it not running. The faults are made on purpose with the fake pipelines of
tests/unit/test_batcher.py; written against the mutants of service/batcher.py that survived the other tests
(tests/mutation/EQUIVALENT.md lists those that cannot be told apart). Split from test_batcher_faults.py."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
from test_batcher import POISON, BrokenPipeline, FakePipeline, batcher, failed, item, run, until
from test_batcher_faults import Job, messages

import service.batcher as batcher_module
from service.batcher import UNHEALTHY_AFTER
from service.errors import NotReady


# -- health: what counts, and the probe's schedule -------------------------------------------------------------------
def test_an_answered_batch_starts_the_count_of_failed_batches_over():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b)
        pipeline.broken = False
        await b.submit([item()])
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b)
        await b.stop()  # after the worker's last iteration
        return b.healthy

    assert run(scenario) is True
    assert pipeline.probes == 0  # never three failed batches in a row


def test_a_passing_probe_starts_the_count_over():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        for _ in range(UNHEALTHY_AFTER):
            await failed(b, POISON)  # bad inputs: the probe passes
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b, POISON)
        await b.stop()
        return b.healthy

    assert run(scenario) is True
    assert pipeline.probes == 1


def test_after_the_probe_ends_an_unhealthy_spell_the_count_starts_over(monkeypatch, caplog):
    monkeypatch.setattr(batcher_module, "PROBE_INTERVALS_S", (0.01, 0.01, 0.01))
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.healthy)
        pipeline.broken = False
        await until(lambda: b.healthy)  # the probe answered
        probes = pipeline.probes
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER - 1):
            await failed(b)
        await b.stop()
        return probes, b.healthy

    with caplog.at_level(logging.INFO, logger="dynfuse"):
        probes, healthy = run(scenario)
    assert healthy is True
    assert pipeline.probes == probes  # two failed batches after the spell: no probe yet
    assert "the batch worker failed an iteration; answering its requests and going on" not in messages(caplog)


def test_probes_while_unhealthy_back_off_along_their_schedule(monkeypatch):
    monkeypatch.setattr(batcher_module, "PROBE_INTERVALS_S", (0.01, 0.05, 0.3))
    pipeline = BrokenPipeline()
    probed_at: list[float] = []

    def probe():
        probed_at.append(time.monotonic())
        return [item("probe")]

    async def scenario():
        b = batcher(pipeline, probe=probe)
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: b._failed_probes >= 4)  # after the one that found it broken, four while unhealthy
        status = b.status()
        await b.stop()  # a probe under way is finished first
        return status, b._failed_probes

    status, failed_probes = run(scenario)
    gaps = [later - earlier for earlier, later in zip(probed_at, probed_at[1:5], strict=False)]
    slack = 0.005  # the event loop's timers may fire up to a clock tick early
    assert [gap >= wait - slack for gap, wait in zip(gaps, (0.01, 0.05, 0.3, 0.3), strict=True)] == [True] * 4, gaps
    assert failed_probes == len(probed_at) - 1  # every probe but the first (before the unhealthy spell) counted once
    assert re.search(r"\(probe: RuntimeError: CUDA error: device lost\); [4-9] probe\(s\) failed since$", status), (
        status
    )


class LongFailure(FakePipeline):
    """Fails every call with a 400-character message."""

    def predict(self, items):
        self.calls.append(len(items))
        raise RuntimeError("x" * 400)


CUT = f"RuntimeError: {'x' * 400}"[:300]


@pytest.mark.parametrize("rows", [1, 2], ids=["one item", "a batch run one by one"])
def test_the_reason_names_the_last_failure_cut_at_300_characters(rows):
    async def scenario():
        b = batcher(LongFailure(), max_batch_size=2)  # no probe: the failed batches alone decide
        b.start()
        for _ in range(UNHEALTHY_AFTER):
            await asyncio.gather(*(b.submit([item()]) for _ in range(rows)), return_exceptions=True)
        await until(lambda: not b.healthy)
        status = b.status()
        await b.stop()
        return status

    assert run(scenario) == f"the last {UNHEALTHY_AFTER} batches failed for every request ({CUT})"


def test_a_failed_probes_reason_is_cut_at_300_characters():
    class LongProbeFailure(BrokenPipeline):
        def predict(self, items):
            if any(i.route == "probe" for i in items):
                raise RuntimeError("x" * 400)
            return super().predict(items)

    pipeline = LongProbeFailure()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")])
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.healthy)
        status = b.status()
        await b.stop()
        return status

    expected = f"probe: RuntimeError: {'x' * 400}"[:300]
    assert run(scenario) == f"the last {UNHEALTHY_AFTER} batches failed for every request ({expected})"


def test_a_pipeline_that_keeps_returning_too_few_outputs_is_named_in_the_reason():
    class Short(FakePipeline):
        def predict(self, items):
            outputs, seconds = super().predict(items)
            return outputs[:-1], seconds

    async def scenario():
        b = batcher(Short(), max_batch_size=1)
        b.start()
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.healthy)
        status = b.status()
        await b.stop()
        return status

    reason = "RuntimeError: the pipeline returned 0 outputs for 1 inputs"
    assert run(scenario) == f"the last {UNHEALTHY_AFTER} batches failed for every request ({reason})"


def test_an_unhealthy_refusal_says_when_to_retry():
    pipeline = BrokenPipeline()

    async def scenario():
        b = batcher(pipeline, probe=lambda: [item("probe")], retry_after_s=9)
        b.start()
        pipeline.broken = True
        for _ in range(UNHEALTHY_AFTER):
            await failed(b)
        await until(lambda: not b.healthy)
        refused = await failed(b)
        await b.stop()
        return refused

    refused = run(scenario)
    assert isinstance(refused, NotReady)
    assert refused.headers == {"Retry-After": "9"}


def test_items_refused_one_by_one_by_the_pipelines_state_reach_their_callers_and_never_count_as_failures():
    class RefusesSome(FakePipeline):
        def predict(self, items):
            outputs, seconds = super().predict(items)
            refusal = NotReady("expert 'muse' has no replica able to answer now")
            return [refusal if i.route == "refuse" else o for i, o in zip(items, outputs, strict=True)], seconds

    probes = []

    async def scenario():
        b = batcher(RefusesSome(), max_batch_size=2, probe=lambda: probes.append(1) or [item()])
        b.start()
        mixed = await asyncio.gather(b.submit([item()]), b.submit([item("refuse")]), return_exceptions=True)
        refused = [await failed(b, "refuse") for _ in range(UNHEALTHY_AFTER * 2)]
        healthy = b.healthy
        await b.stop()
        return mixed, refused, healthy

    (answered, refusal), refused, healthy = run(scenario)
    assert answered[0].output.label == "call1"
    assert isinstance(refusal, NotReady)
    assert refusal.message == "expert 'muse' has no replica able to answer now"
    assert all(isinstance(r, NotReady) for r in refused)
    assert healthy is True
    assert probes == []


# -- stuck detection covers every kind of call -----------------------------------------------------------------------
class HoldsSome(FakePipeline):
    """Holds the calls ``hold(items)`` picks until ``release`` is set."""

    def __init__(self, hold):
        super().__init__()
        self.hold = hold
        self.release = threading.Event()
        self.held = 0

    def predict(self, items):
        if self.hold(items):
            self.held += 1
            self.release.wait(timeout=30)
        return super().predict(items)


@pytest.mark.parametrize("kind", ["probe", "spare", "one by one"])
def test_a_probe_a_spare_job_or_a_one_by_one_rerun_that_hangs_makes_the_batcher_not_running(kind):
    holds = {
        "probe": lambda items: items[0].route == "probe",
        "spare": lambda items: items[0].route == "audit",
        "one by one": lambda items: len(items) == 1 and items[0].route == "held",
    }
    pipeline = HoldsSome(holds[kind])

    async def scenario():
        b = batcher(pipeline, max_batch_size=2, stuck_after_s=0.05, probe=lambda: [item("probe")])
        b.start()
        pending = []
        if kind == "probe":
            for _ in range(UNHEALTHY_AFTER - 1):
                await failed(b, POISON)
            pending.append(asyncio.ensure_future(failed(b, POISON)))  # the third: the probe runs after it
        elif kind == "spare":
            job = Job()
            b.offer_spare(job)
            pending.append(asyncio.ensure_future(job.done.wait()))
        else:
            calls = (b.submit([item("held")]), b.submit([item(POISON)]))
            pending.append(asyncio.gather(*calls, return_exceptions=True))
        await until(lambda: pipeline.held == 1)
        await until(lambda: not b.running)
        status = b.status()
        pipeline.release.set()
        await asyncio.gather(*pending)
        await until(lambda: b.running)
        await b.stop()
        return status

    assert run(scenario) == "one batch has run for over 0.05 s"
