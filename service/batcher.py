"""The micro-batcher: requests queue; one worker forms batches and runs the pipeline off the event loop.

A batch closes when it holds ``max_batch_size`` requests or ``max_batch_delay`` has passed since
its first one arrived. The pipeline runs the shared encoders and router once on the whole batch and
each expert on its own sub-batch, in a single worker thread (the runtime parallelises inside a
call; two concurrent calls would only fight over the cores). While a batch runs, the next one fills.
A full queue refuses new work at once (503 + Retry-After) instead of letting latency grow unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from export.pipeline import DynamicPipeline, PipelineInput, PipelineOutput
from service.errors import Overloaded
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")


@dataclass
class BatchResult:
    output: PipelineOutput
    queue_seconds: float  # enqueued -> its batch started
    inference_seconds: float  # the whole batch's pipeline call


@dataclass
class _Pending:
    item: PipelineInput
    future: asyncio.Future
    enqueued: float


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
    ):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynfuse-batch")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynfuse-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        while self._queue.qsize():
            await asyncio.sleep(0.005)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, items: list[PipelineInput]) -> list[BatchResult]:
        """Queue the items (all or none) and wait for their results, in order."""
        if self._queue.qsize() + len(items) > self.max_queue:
            raise Overloaded(
                f"the server is at capacity ({self.max_queue} requests queued); retry after {self.retry_after_s} s",
                self.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        for p in pending:
            self._queue.put_nowait(p)
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [p for p in batch if not p.future.done()]  # the client may have gone away
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs, expert_seconds = await loop.run_in_executor(
                    self._executor, self.pipeline.predict, [p.item for p in batch]
                )
            except Exception as error:  # noqa: BLE001 - handed to every waiting request, logged there
                logger.exception("pipeline failed on a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(error)
                continue
            inference = time.perf_counter() - started
            assert len(outputs) == len(batch), f"pipeline returned {len(outputs)} outputs for {len(batch)} inputs"
            queue_seconds = [started - p.enqueued for p in batch]
            self.metrics.observe_batch(len(batch), queue_seconds, expert_seconds)
            for p, output, waited in zip(batch, outputs, queue_seconds, strict=True):
                if not p.future.done():
                    p.future.set_result(BatchResult(output, waited, inference))

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_batch_delay_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch
