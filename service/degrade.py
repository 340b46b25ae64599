"""Degrading instead of refusing: under a burst, serve new requests at a cheaper operating point for a while.

A dynamic model has a lever a static one lacks: it can spend less per request. When the queue passes a high-water
mark, requests that did not ask for an operating point are served at a cheaper one (``DYNFUSE_DEGRADE_TO``) until
the queue drains below a low-water mark; the gap between the two marks keeps the mode from flapping. Every
degraded response names its operating point, and the metrics count the requests and the seconds spent degraded.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DegradeController:
    def __init__(
        self,
        operating_point: str | None,  # the cheaper point; None: never degrade
        high_water: int,  # queued requests at which degrading starts
        low_water: int,  # ... and at or below which it stops
        on_seconds: Callable[[float], None] = lambda seconds: None,  # time spent degraded, reported as it passes
        clock: Callable[[], float] = time.monotonic,
    ):
        assert low_water < high_water, f"low water {low_water} must be below high water {high_water}"
        self.operating_point = operating_point
        self.high_water = high_water
        self.low_water = low_water
        self._on_seconds = on_seconds
        self._clock = clock
        self._since: float | None = None  # when the current degraded spell started, or was last reported

    @property
    def degraded(self) -> bool:
        return self._since is not None

    def update(self, queued: int) -> bool:
        """Note the queue length; whether new requests are served degraded now."""
        if self.operating_point is None:
            return False
        now = self._clock()
        if self._since is None:
            if queued >= self.high_water:
                self._since = now
        else:
            self._on_seconds(now - self._since)
            self._since = None if queued <= self.low_water else now
        return self._since is not None

    def close(self) -> None:
        """Report the seconds of a spell still running (at shutdown)."""
        if self._since is not None:
            self._on_seconds(self._clock() - self._since)
            self._since = None
