"""A one-sided Bernoulli CUSUM: has the rate of an event (a disagreement, an out-of-distribution input) risen?

Each observation is an event or not. In control the event's probability is ``p0``; the test is designed to
detect a rise to ``p1`` (> ``p0``). The statistic adds each observation's log-likelihood ratio of the two,

    event: log(p1 / p0) > 0,   no event: log((1 - p1) / (1 - p0)) < 0,

and is floored at 0 (Page's CUSUM: S = max(0, S + llr)); it alarms at S >= h. Among the tests of a change that
keep false alarms at a given rate, it is the one that detects the change to ``p1`` soonest (Moustakides, 1986). A
point estimate over a sliding window, checked after every observation, is neither: each check is a new chance of
a false alarm, and the window keeps mixing in observations from before the change.

``h`` is set from a target false-alarm rate, the in-control average run length (ARL0: observations, on average,
between false alarms when the probability is ``p0``), computed exactly for the statistic on a grid (the
increments rounded to whole steps of a grid fine enough that the rounding moves ARL0 by a few percent at most):
the ARL from each grid state solves a linear system (Brook and Evans, 1972).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GRID_SMALL_STEPS = 12  # grid steps of the smaller increment, at most (each is rounded by half a step at most)
GRID_LARGE_STEPS = 120  # grid steps of the larger increment, at most: bounds the linear system's size
MAX_STATES = 1000  # grid states below h, at most: a very rare false alarm (a large h) is computed on a coarser grid


@dataclass(frozen=True)
class Design:
    p0: float  # the event's probability in control
    p1: float  # the probability the test is designed to detect (> p0)

    def __post_init__(self) -> None:
        assert 0.0 <= self.p0 < self.p1 < 1.0, f"a rise of a probability: 0 <= p0 < p1 < 1, got {self}"

    @property
    def up(self) -> float:
        """The statistic's step on an event (inf when p0 = 0: an event that never happens in control)."""
        return math.inf if self.p0 == 0.0 else math.log(self.p1 / self.p0)

    @property
    def down(self) -> float:
        """The statistic's step (negative) on no event."""
        return math.log((1.0 - self.p1) / (1.0 - self.p0))

    def step(self, event: bool) -> float:
        return self.up if event else self.down


def grid(design: Design, h: float) -> float:
    """The grid's step below ``h``: a twelfth of the smaller increment, or a 120th of the larger when that is
    coarser, or coarser still when h needs more than ``MAX_STATES`` of them (a dense solve of that size: ~20 ms)."""
    small, large = sorted((design.up, -design.down))
    return max(small / GRID_SMALL_STEPS, large / GRID_LARGE_STEPS, h / MAX_STATES)


def run_length(design: Design, h: float, p: float | None = None) -> float:
    """The average number of observations until S >= h, from S = 0, when each is an event with probability ``p``
    (default ``p0``: the in-control ARL, ARL0). On the grid of the module's docstring."""
    p = design.p0 if p is None else p
    if h <= 0:
        return 1.0
    if math.isinf(design.up):
        return math.inf if p == 0 else 1.0 / p
    delta = grid(design, h)
    down, up = max(1, round(-design.down / delta)), max(1, round(design.up / delta))
    states = max(1, math.ceil(h / delta - 1e-9))  # grid states 0 .. states-1 are below h
    if p == 0.0:
        return math.inf
    transition = np.zeros((states, states))
    for k in range(states):
        if k + up < states:
            transition[k, k + up] += p
        transition[k, max(0, k - down)] += 1.0 - p
    lengths = np.linalg.solve(np.eye(states) - transition, np.ones(states))
    return float(lengths[0])


@lru_cache(maxsize=256)  # each costs up to a few dozen linear solves; a replay builds thousands of guards
def threshold(design: Design, arl0: float) -> float:
    """The smallest h (to within the grid's step) whose in-control ARL is at least ``arl0``."""
    if math.isinf(design.up):
        return 0.0  # an event that never happens in control: the first one is evidence enough
    if 1.0 / design.p0 >= arl0 * (1 - 1e-9):  # (1 - 0.95 is not 0.05 in binary: 1 / it is 19.999999999999982)
        return design.up  # the first event alarms, and that alone is rare enough
    low, high = design.up, 2 * design.up  # ARL0(low) = 1 / p0 < arl0
    while run_length(design, high) < arl0:  # ARL0 grows about like exp(h): double until past it
        low, high = high, 2 * high
        assert high < 200, f"no threshold reaches an ARL0 of {arl0} for {design}"
    while high - low > grid(design, high):  # down to the grid's step: ARL0(low) < arl0 <= ARL0(high)
        middle = (low + high) / 2
        if run_length(design, middle) >= arl0:
            high = middle
        else:
            low = middle
    return high


class Cusum:
    """The statistic, fed one observation at a time; ``cap`` (optional) bounds it from above, so that a long
    stretch of events does not take as long again to forget once they stop."""

    def __init__(self, design: Design, h: float, cap: float | None = None):
        self.design = design
        self.h = h
        self.cap = cap
        self.value = 0.0
        self.observations = 0

    @property
    def alarmed(self) -> bool:
        """At or above ``h``, on some evidence (h = 0: the first event)."""
        return self.value >= self.h and self.value > 0

    def observe(self, event: bool) -> bool:
        """Add one observation; whether the statistic is now at or above ``h``."""
        self.observations += 1
        self.value = max(0.0, self.value + self.design.step(event))
        if self.cap is not None:
            self.value = min(self.value, self.cap)
        return self.alarmed

    def reset(self) -> None:
        self.value = 0.0
        self.observations = 0
