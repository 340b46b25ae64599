"""The micro-batcher: requests queue; one supervised worker forms batches and runs the pipeline off the event loop.

A batch closes when it holds ``max_batch_size`` requests or ``max_batch_delay`` has passed since
its first one arrived. The pipeline runs the shared encoders and router once on the whole batch and
each expert on its own sub-batch, in a single worker thread (the runtime parallelises inside a
call; two concurrent calls would only fight over the cores). While a batch runs, the next one fills.

What keeps it from wedging:

- The worker loop survives any error: an iteration that fails answers the requests it held and the
  loop goes on; if the task itself ends (it never should), a supervisor starts a new one after a
  short backoff. ``running`` is False meanwhile, and while a batch has run for longer than a request
  may wait, so that ``/readyz`` answers 503 and an orchestrator can replace the process.
- Every request has a deadline: past it, the caller gets ``DeadlineExceeded`` (504) and its items
  are skipped if they have not started.
- A failing item fails only itself: when a batch fails, its items run again one by one.
- ``stop()`` refuses new work at once, then answers everything already accepted (served, or 503 if
  the worker cannot finish within the grace period).
- Health: a batch in which every request failed says little alone (its inputs may be bad), but
  ``UNHEALTHY_AFTER`` of them in a row make the batcher run a probe (``probe()``: an input known to be
  good); if that fails too, the pipeline itself is broken (a lost device, a broken session). The batcher
  is then unhealthy: ``ready`` is False with the reason (``/readyz`` answers 503 with it), new work is
  refused with 503 at once, and the probe runs again every few seconds, without traffic, until it
  passes. A batch that answers any request also ends it. A refusal by the pipeline's own passing state
  (an ApiError: a Ray expert deployment restarting, answered 503 with Retry-After) counts neither way.
- The queue bound refuses a call only when the queue is already full, whatever its size: a call of
  many rows is admitted whenever a call of one would be (the queue may then briefly hold up to
  ``max_queue + rows - 1`` items), so no valid call is refused forever.

Spare work (the shadow audits of service/audit.py) waits in a lane of its own and runs only in spare capacity:
one job at a time, and only when no request is queued or running, so it never sits in front of a request (a
request that arrives while a job runs waits for that one job at most). The lane is bounded: when it is full the
oldest job is dropped (and told so), and at shutdown every job still waiting is dropped. Spare work does not
count towards the batcher's health, and waits while the pipeline is unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from export.pipeline import DynamicPipeline, PipelineInput, PipelineOutput
from service.errors import ApiError, DeadlineExceeded, NotReady, Overloaded
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")

RESTART_BACKOFF_S = (0.05, 0.2, 1.0, 5.0)  # after the 1st, 2nd, 3rd, ... consecutive failure
UNHEALTHY_AFTER = 3  # batches in a row in which every request failed, before the probe decides
PROBE_INTERVALS_S = (1.0, 2.0, 5.0)  # between probes while unhealthy: after the 1st, 2nd, 3rd+ failed probe
# A deferred item still waiting this long before its request's deadline gets DeadlineExceeded saying what it waited
# for: the server's own 504 at the deadline (service/admission.py) cannot say it.
DEFERRED_GIVE_UP_S = 0.5
_STOP = object()  # queued by stop(): everything before it is answered, then the worker ends


@dataclass
class BatchResult:
    output: PipelineOutput
    queue_seconds: float  # enqueued -> its batch started
    inference_seconds: float  # the whole batch's pipeline call
    uncertain_reason: str | None = None  # why the answer is uncertain, under the server's settings (set by classify)


class SpareJob(Protocol):
    """Work for spare capacity: its inputs, and what to do with their outputs (called on the event loop)."""

    items: list[PipelineInput]

    def finished(self, outputs: list[PipelineOutput]) -> None: ...

    def failed(self, error: BaseException) -> None: ...

    def dropped(self) -> None: ...


@dataclass
class _Pending:
    item: PipelineInput
    future: asyncio.Future
    enqueued: float
    deadline: float | None = None  # time.monotonic() past which its caller no longer waits
    waiting_for: str = ""  # what its deferred output waits for (a Deferred's reason)


class Deferred(Future):
    """An output not ready when its batch is, settled later by the pipeline (a Ray expert deployment still
    computing): the batcher answers its caller then, and goes on with the next batch meanwhile. ``reason`` says
    what it waits for; a caller whose deadline passes first is told."""

    def __init__(self, reason: str = ""):
        super().__init__()
        self.reason = reason


class MicroBatcher:
    def __init__(
        self,
        pipeline: DynamicPipeline,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        retry_after_s: int = 1,
        stuck_after_s: float = 30.0,
        probe: Callable[[], list[PipelineInput]] | None = None,
        on_batch_taken: Callable[[int], None] | None = None,
        max_spare: int = 64,
    ):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.stuck_after_s = stuck_after_s  # a batch running longer than this means the worker is wedged
        self.restarts = 0  # times the supervisor had to start a new worker task
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynfuse-batch")
        self._worker: asyncio.Task | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._in_hand: list[_Pending] = []  # taken from the queue, not answered yet
        self._batch_started: float | None = None  # monotonic time the running pipeline call started
        self._failures = 0  # consecutive failed iterations or worker deaths: how long the next backoff is
        self._backoff_until = 0.0  # monotonic time until which the worker is backing off after a failure
        self._stopping = False
        self.probe = probe  # makes inputs known to be good; None: health follows the real batches only
        self.on_batch_taken = on_batch_taken  # called with what is still queued when a batch leaves the queue
        self._all_failed = 0  # batches in a row in which every request failed
        self._last_failure = ""  # what the last failed request failed with, for the reason
        self._unhealthy: str | None = None  # why the pipeline is considered broken; None while it is not
        self._failed_probes = 0
        self._spare: deque[SpareJob] = deque()  # waiting for spare capacity, oldest first
        self.max_spare = max_spare
        self._work = asyncio.Event()  # set when a request or a spare job arrives: wakes an idle worker

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._spawn()

    @property
    def running(self) -> bool:
        """The worker is alive, not backing off after a failure, and not stuck in one batch."""
        if self._stopping or self._worker is None or self._worker.done():
            return False
        if time.monotonic() < self._backoff_until:
            return False
        started = self._batch_started
        return started is None or time.monotonic() - started < self.stuck_after_s

    @property
    def healthy(self) -> bool:
        """The pipeline answers (see "Health" above)."""
        return self._unhealthy is None

    @property
    def ready(self) -> bool:
        """What readiness reports: running and healthy."""
        return self.running and self.healthy

    @property
    def queued(self) -> int:
        """Items waiting: in the queue, and in a batch that is still filling (not the batch running now)."""
        filling = len(self._in_hand) if self._batch_started is None else 0
        return self._queue.qsize() + filling

    def status(self) -> str:
        """Why the batcher is (not) running, for /readyz."""
        if self._stopping:
            return "stopping"
        if self._worker is None:
            return "not started"
        if self._worker.done() or time.monotonic() < self._backoff_until:
            return f"restarting after {self._failures} consecutive failure(s)"
        if not self.running:
            return f"one batch has run for over {self.stuck_after_s:g} s"
        if self._unhealthy is not None:
            probes = f"; {self._failed_probes} probe(s) failed since" if self._failed_probes else ""
            return f"{self._unhealthy}{probes}"
        return "running"

    async def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new work, answer everything accepted (within ``grace_s``), then stop the worker."""
        if self._stopping:
            return
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        worker = self._worker
        if worker is not None and not worker.done():
            self._queue.put_nowait(_STOP)
            self._work.set()
            done, _ = await asyncio.wait({worker}, timeout=grace_s)
            if not done:
                logger.error("the batch worker did not finish within %.0f s; answering the rest with 503", grace_s)
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker
        self._fail_all(NotReady("the server is shutting down; retry on another replica", self.retry_after_s))
        while self._spare:
            _tell(self._spare.popleft().dropped)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- submitting ------------------------------------------------------------------------------
    async def submit(self, items: list[PipelineInput], deadline: float | None = None) -> list[BatchResult]:
        """Queue the items (all or none) and wait for their results, in order, until ``deadline``
        (``time.monotonic()``; None: no deadline)."""
        if self._stopping:
            raise NotReady("the server is shutting down; retry on another replica", self.retry_after_s)
        if self._unhealthy is not None and self.probe is not None:  # the probe, not requests, tells recovery
            raise NotReady(f"the model cannot answer now: {self._unhealthy}; retry later", self.retry_after_s)
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(
                f"the server is at capacity ({self.max_queue} requests queued); retry after {self.retry_after_s} s",
                self.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = [_Pending(item, loop.create_future(), now, deadline) for item in items]
        for p in pending:
            self._queue.put_nowait(p)
        self._work.set()
        futures = [p.future for p in pending]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, waiting = await asyncio.wait(futures, timeout=timeout)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # the worker skips them
            raise
        if waiting:
            for future in futures:
                future.cancel()
            raise DeadlineExceeded(
                f"no answer within the request deadline ({len(waiting)} of {len(futures)} item(s) not served); "
                "retry later, or with fewer items"
            )
        return [future.result() for future in futures]

    def offer_spare(self, job: SpareJob) -> None:
        """Run ``job`` when there is spare capacity. When the lane is full, its oldest job is dropped for it; while
        stopping, ``job`` itself is."""
        if self._stopping:
            _tell(job.dropped)
            return
        if len(self._spare) >= self.max_spare:
            _tell(self._spare.popleft().dropped)
        self._spare.append(job)
        self._work.set()

    @property
    def spare_waiting(self) -> int:
        return len(self._spare)

    # -- the worker ------------------------------------------------------------------------------
    def _spawn(self) -> None:
        self._restart = None
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynfuse-batcher")
        self._worker.add_done_callback(self._on_worker_exit)

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        """The supervisor: a worker that ends while the batcher should run is replaced."""
        error = None if task.cancelled() else task.exception()
        if self._stopping and error is None:
            return
        self._fail_in_hand(RuntimeError(f"the batch worker ended ({error!r})"))
        if self._stopping:
            return
        self.restarts += 1
        delay = self._back_off()
        logger.error("the batch worker ended (%r); starting a new one in %.2f s", error, delay, exc_info=error)
        self._restart = asyncio.get_running_loop().call_later(delay, self._spawn)

    async def _run(self) -> None:
        while True:
            try:
                batch, stop = await self._next_batch()
                self._batch_taken()
                if batch:
                    await self._note_outcome(await self._process(batch))
                elif not stop and self._spare and self._queue.empty():
                    await self._process_spare(self._spare.popleft())
                self._failures = 0
                if stop:
                    return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the loop must outlive any bug in one iteration
                logger.exception("the batch worker failed an iteration; answering its requests and going on")
                self._fail_in_hand(error)
                await asyncio.sleep(self._back_off())

    def _back_off(self) -> float:
        """Seconds to wait after one more consecutive failure (a fault that repeats must not spin the loop)."""
        self._failures += 1
        delay = RESTART_BACKOFF_S[min(self._failures, len(RESTART_BACKOFF_S)) - 1]
        self._backoff_until = time.monotonic() + delay
        return delay

    async def _next_batch(self) -> tuple[list[_Pending], bool]:
        """Up to ``max_batch_size`` live requests, and whether stop() was queued behind them; no requests when none
        is queued and spare work waits (the worker does that instead)."""
        if self.healthy or self.probe is None:
            while self._queue.empty():
                if self._spare:
                    return [], False
                self._work.clear()
                await self._work.wait()
            first = self._queue.get_nowait()
        else:
            first = await self._probe_until_entry()
        if first is _STOP:
            return [], True
        self._in_hand = [first]
        deadline = time.perf_counter() + self.max_batch_delay_s
        while len(self._in_hand) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()
            if entry is _STOP:
                return self._live(), True
            self._in_hand.append(entry)
        return self._live(), False

    def _live(self) -> list[_Pending]:
        """The batch in hand without the requests whose callers gave up (deadline, disconnect)."""
        self._in_hand = [p for p in self._in_hand if not p.future.done()]
        return self._in_hand

    def _batch_taken(self) -> None:
        if self.on_batch_taken is None:
            return
        try:
            self.on_batch_taken(self._queue.qsize())
        except Exception:  # noqa: BLE001 - bookkeeping must not take the batch or the loop down with it
            logger.exception("on_batch_taken failed")

    # -- health ----------------------------------------------------------------------------------
    async def _note_outcome(self, answered: int | None) -> None:
        """After a batch: ``answered`` of its requests got an answer (None: refused by the pipeline's own state)."""
        if answered is None:
            return
        if answered:
            self._all_failed = 0
            self._recovered("a batch was answered")
            return
        self._all_failed += 1
        if self._all_failed < UNHEALTHY_AFTER or self._unhealthy is not None:
            return
        if self.probe is not None and await self._probe_passes():
            self._all_failed = 0  # a good input is answered: those inputs were the trouble, not the pipeline
            return
        self._unhealthy = f"the last {self._all_failed} batches failed for every request ({self._last_failure})"
        self._failed_probes = 0
        logger.error("the model is unhealthy: %s; probing it until it answers", self._unhealthy)

    def _recovered(self, how: str) -> None:
        if self._unhealthy is not None:
            logger.warning("the model answers again (%s): healthy", how)
        self._unhealthy = None
        self._failed_probes = 0

    async def _probe_passes(self) -> bool:
        """Run a known-good input through the pipeline (on the worker's thread, like a batch)."""
        loop = asyncio.get_running_loop()
        self._batch_started = time.monotonic()
        try:
            items = self.probe()
            outputs, _ = await loop.run_in_executor(self._executor, self.pipeline.predict, items)
            refused = next((output for output in outputs if isinstance(output, ApiError)), None)
            if refused is not None:
                self._last_failure = f"probe: {type(refused).__name__}: {refused}"[:300]
            return len(outputs) == len(items) and refused is None
        except Exception as error:  # noqa: BLE001 - a failed probe is the answer sought
            self._last_failure = f"probe: {type(error).__name__}: {error}"[:300]
            return False
        finally:
            self._batch_started = None

    async def _probe_until_entry(self):
        """While unhealthy: wait for a queue entry (stop(), or work queued before), probing between waits."""
        while not self.healthy:
            interval = PROBE_INTERVALS_S[min(self._failed_probes, len(PROBE_INTERVALS_S) - 1)]
            try:
                return await asyncio.wait_for(self._queue.get(), interval)
            except asyncio.TimeoutError:
                pass
            if await self._probe_passes():
                self._all_failed = 0
                self._recovered("the probe was answered")
            else:
                self._failed_probes += 1
        return await self._queue.get()

    async def _process_spare(self, job: SpareJob) -> None:
        """One spare job, with the worker's executor (never beside a batch); its failure is its own, not the
        batcher's: it counts towards neither the worker's failures nor its health."""
        loop = asyncio.get_running_loop()
        self._batch_started = time.monotonic()
        try:
            outputs, _ = await loop.run_in_executor(self._executor, self.pipeline.predict, job.items)
        except Exception as error:  # noqa: BLE001 - handed to the job
            logger.warning("spare work failed: %r", error)
            _tell(job.failed, error)
            return
        finally:
            self._batch_started = None
        refused = next((output for output in outputs if isinstance(output, ApiError)), None)
        if refused is None and any(isinstance(output, Future) for output in outputs):
            refused = NotReady("an expert deployment did not answer in time", self.retry_after_s)
        if refused is not None:  # an item the pipeline could not serve now (a Ray expert deployment down or late)
            _tell(job.failed, refused)
            return
        _tell(job.finished, outputs)

    async def _process(self, batch: list[_Pending]) -> int | None:
        """Run one batch and answer its requests; how many got an answer (not an error), or None when the pipeline
        refused them all with an ApiError: its own passing state (a Ray expert deployment restarting, answered 503
        with Retry-After), which says nothing of its health either way."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._batch_started = time.monotonic()
        try:
            outputs, expert_seconds = await loop.run_in_executor(
                self._executor, self.pipeline.predict, [p.item for p in batch]
            )
            if len(outputs) != len(batch):
                raise RuntimeError(f"the pipeline returned {len(outputs)} outputs for {len(batch)} inputs")
        except ApiError as error:
            # The pipeline's own state, not an item's fault (an expert deployment of the Ray engine that cannot
            # answer now: 503 with Retry-After): every request of the batch gets it as it is.
            logger.warning("the pipeline refused a batch of %d: %s", len(batch), error)
            self._fail_in_hand(error)
            return None
        except Exception as error:  # noqa: BLE001 - one bad item must not fail its neighbours: find it
            self._last_failure = f"{type(error).__name__}: {error}"[:300]
            if len(batch) > 1:
                logger.exception("the pipeline failed on a batch of %d; running its items one by one", len(batch))
                return await self._process_one_by_one(batch)
            logger.exception("the pipeline failed on one item")
            self._fail_in_hand(RuntimeError("the pipeline failed on this input"))
            return 0
        finally:
            self._batch_started = None
        inference = time.perf_counter() - started
        queue_seconds = [started - p.enqueued for p in batch]
        for p, output, waited in zip(batch, outputs, queue_seconds, strict=True):
            self._answer(p, output, waited, inference, started)
        self._in_hand = []
        try:
            self.metrics.observe_batch(len(batch), queue_seconds, expert_seconds)
        except Exception:  # noqa: BLE001 - bookkeeping must not take the answers or the loop down with it
            logger.exception("could not record a batch's metrics")
        refused = sum(isinstance(output, (ApiError, Future)) for output in outputs)
        return None if refused == len(batch) else len(batch) - refused

    def _answer(self, p: _Pending, output, waited: float, inference: float, started: float) -> None:
        """Answer one item with its output: an ApiError when it alone could not be served (a Ray expert deployment
        down), or a Future when it waits for an expert still computing (its caller is answered when the future
        settles, its inference time then counted until that moment, or DEFERRED_GIVE_UP_S before its deadline with
        DeadlineExceeded saying what it waited for; the worker goes on meanwhile)."""
        if p.future.done():
            return
        if isinstance(output, Future):
            p.waiting_for = getattr(output, "reason", "")
            loop = asyncio.get_running_loop()
            if p.deadline is not None:

                def give_up() -> None:
                    if not p.future.done():
                        waited = f": {p.waiting_for}" if p.waiting_for else ""
                        p.future.set_exception(DeadlineExceeded(f"no answer within the request deadline{waited}"))

                loop.call_later(max(0.0, p.deadline - DEFERRED_GIVE_UP_S - time.monotonic()), give_up)

            def settle(done: Future) -> None:
                if p.future.done():
                    return
                error = done.exception()
                if error is not None:
                    p.future.set_exception(error)
                else:
                    p.future.set_result(BatchResult(done.result(), waited, time.perf_counter() - started))

            def on_done(done: Future) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                    loop.call_soon_threadsafe(settle, done)

            output.add_done_callback(on_done)
        elif isinstance(output, ApiError):
            p.future.set_exception(output)
        else:
            p.future.set_result(BatchResult(output, waited, inference))

    async def _process_one_by_one(self, batch: list[_Pending]) -> int:
        loop = asyncio.get_running_loop()
        answered = 0
        for p in batch:
            if p.future.done():
                continue
            started = time.perf_counter()
            self._batch_started = time.monotonic()
            try:
                [output], _ = await loop.run_in_executor(self._executor, self.pipeline.predict, [p.item])
            except Exception as error:  # noqa: BLE001 - handed to this item's caller alone
                logger.exception("the pipeline failed on one item of a failed batch")
                self._last_failure = f"{type(error).__name__}: {error}"[:300]
                if not p.future.done():
                    p.future.set_exception(RuntimeError(f"the pipeline failed on this input ({error!r})"))
                continue
            finally:
                self._batch_started = None
            if isinstance(output, (ApiError, Future)):
                self._answer(p, output, started - p.enqueued, time.perf_counter() - started, started)
                continue
            answered += 1
            if not p.future.done():
                p.future.set_result(BatchResult(output, started - p.enqueued, time.perf_counter() - started))
        self._in_hand = []
        return answered

    # -- answering what cannot be served ---------------------------------------------------------
    def _fail_in_hand(self, error: BaseException) -> None:
        for p in self._in_hand:
            if not p.future.done():
                p.future.set_exception(error)
        self._in_hand = []

    def _fail_all(self, error: BaseException) -> None:
        self._fail_in_hand(error)
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not _STOP and not entry.future.done():
                entry.future.set_exception(error)


def _tell(callback, *args) -> None:
    """Call a spare job's callback; its errors are logged, never the worker's."""
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - bookkeeping must not take the worker down
        logger.exception("a spare job's callback failed")
