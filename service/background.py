"""What a response does once it is sent, run on the event loop itself.

Starlette's ``BackgroundTask`` runs a plain (not ``async``) function in anyio's worker threads: a hop that cost the
event loop about a tenth of a single request's CPU (bench/request_cost.py), for the audits' ``after_response``,
which is a few microseconds of bookkeeping that never blocks. It also touched the batcher's spare lane (a deque the
loop reads, an ``asyncio.Event``, which is not thread-safe) from another thread. ``OnTheLoop`` is what a response's
``background`` is given instead: the function is called directly, on the loop, after the body is sent.

Only for functions that never block: anything that waits on I/O or runs for long belongs in a thread or a task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class OnTheLoop:
    """A response's background work: ``func(*args)`` called on the event loop once the response was sent."""

    __slots__ = ("args", "func")

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func = func
        self.args = args

    async def __call__(self) -> None:
        self.func(*self.args)
