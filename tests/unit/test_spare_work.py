"""The micro-batcher's spare lane (shadow audits): spare work never sits in front of a request, runs when the
batcher is idle, is dropped oldest first when its lane is full and at shutdown, and its failures are its own."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from export.pipeline import PipelineInput, PipelineOutput
from service.batcher import MicroBatcher
from service.metrics import Metrics


class RecordingPipeline:
    """Records the routes of every call, in order; ``gate`` (when set) holds each call until released, and says
    when a call has started (``started``)."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def predict(self, items):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "the gate was never opened"
        self.calls.append([item.route for item in items])
        if any(item.route == "broken" for item in items):
            raise ValueError("this spare job breaks the pipeline")
        return [output(item.route) for item in items], {}


def output(label: str) -> PipelineOutput:
    return PipelineOutput(
        label=label,
        probabilities=np.ones(2, np.float32) / 2,
        expert="text",
        decided_by="router",
        route_scores=np.ones(3, np.float32) / 3,
        modality_weights=np.array([0.5, 0.5], np.float32),
        importance=np.array([1.0, 0.0], np.float32),
        madds=1,
        operating_point="p",
    )


def item(route: str) -> PipelineInput:
    return PipelineInput(token_ids=np.zeros(4, np.int64), image=None, route=route)


class Job:
    def __init__(self, name: str):
        self.name = name
        self.items = [item(name)]
        self.outcome: str | None = None
        self.done = asyncio.Event()

    def finished(self, outputs):
        self.outcome = f"finished:{outputs[0].label}"
        self.done.set()

    def failed(self, error):
        self.outcome = f"failed:{type(error).__name__}"
        self.done.set()

    def dropped(self):
        self.outcome = "dropped"
        self.done.set()


def batcher(pipeline, **overrides) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_batch_delay_s": 0.005, "max_queue": 32} | overrides
    return MicroBatcher(pipeline, Metrics("m"), **options)


async def until(condition, timeout: float = 30.0) -> None:
    """Wait on the event loop for ``condition()``, with a deadline generous enough for a loaded machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def run(scenario, timeout: float = 30.0):
    async def bounded():
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


async def started(pipeline: RecordingPipeline) -> None:
    """Until the pipeline's current call has started (it then waits at the gate)."""
    await asyncio.to_thread(pipeline.started.wait, 30)
    pipeline.started.clear()


def test_spare_work_never_runs_ahead_of_a_queued_request():
    pipeline = RecordingPipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        first = asyncio.create_task(b.submit([item("request-1")]))
        await started(pipeline)  # request-1 runs, held at the gate
        jobs = [Job(f"audit-{k}") for k in range(3)]
        for job in jobs:
            b.offer_spare(job)  # offered before the next requests...
        later = [asyncio.create_task(b.submit([item(f"request-{k}")])) for k in (2, 3)]
        await until(lambda: b.queued == 2)  # ...which are queued while request-1 still runs
        pipeline.gate.set()
        await asyncio.gather(first, *later)
        await asyncio.gather(*(job.done.wait() for job in jobs))
        await b.stop()
        return jobs

    jobs = run(scenario)
    order = [route for call in pipeline.calls for route in call]
    assert order[0] == "request-1"
    assert sorted(order[1:3]) == ["request-2", "request-3"], order  # both requests before any audit
    assert order[3:] == ["audit-0", "audit-1", "audit-2"], order
    assert all(len(call) == 1 for call in pipeline.calls if call[0].startswith("audit")), "one job per call"
    assert [job.outcome for job in jobs] == ["finished:audit-0", "finished:audit-1", "finished:audit-2"]


def test_a_request_that_arrives_while_spare_work_runs_goes_before_the_next_job():
    pipeline = RecordingPipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        jobs = [Job("audit-0"), Job("audit-1")]
        for job in jobs:
            b.offer_spare(job)
        await started(pipeline)  # audit-0 runs on the idle batcher, held at the gate
        request = asyncio.create_task(b.submit([item("request")]))
        await until(lambda: b.queued == 1)  # queued while audit-0 runs
        pipeline.gate.set()
        await request
        await asyncio.gather(*(job.done.wait() for job in jobs))
        await b.stop()

    run(scenario)
    assert [call[0] for call in pipeline.calls] == ["audit-0", "request", "audit-1"]


def test_spare_work_runs_on_an_idle_batcher():
    pipeline = RecordingPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        for _ in range(3):  # the worker's task runs until it waits for work (nothing queued): no clock involved
            await asyncio.sleep(0)
        assert b.queued == 0 and b.spare_waiting == 0 and b.running  # noqa: PT018
        job = Job("audit")
        b.offer_spare(job)
        await job.done.wait()
        await b.stop()
        return job

    assert run(scenario).outcome == "finished:audit"


def test_a_full_lane_drops_its_oldest_job_and_stop_drops_the_rest():
    pipeline = RecordingPipeline()
    pipeline.gate = threading.Event()

    async def scenario():
        b = batcher(pipeline, max_spare=2)
        b.start()
        busy = asyncio.create_task(b.submit([item("request")]))
        await started(pipeline)
        jobs = [Job(f"audit-{k}") for k in range(3)]
        for job in jobs:
            b.offer_spare(job)
        assert jobs[0].outcome == "dropped"  # the lane holds 2: the oldest made room
        assert b.spare_waiting == 2
        stopping = asyncio.create_task(b.stop())
        await until(lambda: b.status() == "stopping")
        pipeline.gate.set()
        await asyncio.gather(busy, stopping)
        late = Job("late")
        b.offer_spare(late)
        return jobs, late

    jobs, late = run(scenario)
    assert [job.outcome for job in jobs] == ["dropped", "dropped", "dropped"]
    assert late.outcome == "dropped"
    assert [call[0] for call in pipeline.calls] == ["request"]


def test_a_failing_spare_job_fails_alone_and_the_batcher_stays_ready():
    pipeline = RecordingPipeline()

    async def scenario():
        b = batcher(pipeline)
        b.start()
        broken = Job("broken")
        b.offer_spare(broken)
        await broken.done.wait()
        assert b.running
        assert b.status() == "running"
        [result] = await b.submit([item("request")])
        await b.stop()
        return broken, result

    broken, result = run(scenario)
    assert broken.outcome == "failed:ValueError"
    assert result.output.label == "request"


def test_a_spare_job_whose_item_the_pipeline_refused_fails():
    """The Ray engine's pipeline answers an item it cannot serve now with the error in its place."""
    from service.errors import NotReady

    class Refusing(RecordingPipeline):
        def predict(self, items):
            return [NotReady("expert 'mi2p' has no replica able to answer now", 1) for _ in items], {}

    async def scenario():
        b = batcher(Refusing())
        b.start()
        job = Job("audit")
        b.offer_spare(job)
        await job.done.wait()
        await b.stop()
        return job

    assert run(scenario).outcome == "failed:NotReady"
