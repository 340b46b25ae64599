"""service/cusum.py's run lengths at the smallest grids, where the chain is small enough to solve by hand.

The design p0 = 0.9, p1 = 0.91: an event steps the statistic up by log(0.91 / 0.9) = 0.011050 and no event steps it
down by log(0.09 / 0.1) = -0.105361. The grid is a twelfth of the down step (0.008780, finer than a 120th of the
up step), so an event is 0.011050 / 0.008780 = 1.26, i.e. 1 grid step up, and no event 12 steps down: back to 0
from any state below h. With h at k grid steps, an alarm is then k events in a row, whose average waiting time
(a coin of probability p thrown until k heads in a row) is (1 - p^k) / ((1 - p) p^k): 1/p for one, (1 + p) / p^2
for two."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.cusum import Design, grid, run_length

DESIGN = Design(0.9, 0.91)
STEP = 0.10536051565782628 / 12  # -log(0.09 / 0.1) / 12


def test_the_design_makes_an_event_one_grid_step_and_no_event_twelve():
    assert grid(DESIGN) == pytest.approx(STEP, rel=1e-12)
    assert round(DESIGN.up / STEP) == 1
    assert round(-DESIGN.down / STEP) == 12


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_under_one_grid_step_the_first_event_alarms(p):
    assert run_length(DESIGN, STEP / 2, p) == pytest.approx(1 / p, rel=1e-9)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_at_two_grid_steps_it_takes_two_events_in_a_row(p):
    """h = 2 steps exactly: the states below it are 0 and 1 (the statistic at 2 steps has crossed)."""
    assert run_length(DESIGN, 2 * grid(DESIGN), p) == pytest.approx((1 + p) / p**2, rel=1e-9)
    assert run_length(DESIGN, 3 * grid(DESIGN), p) == pytest.approx((1 - p**3) / ((1 - p) * p**3), rel=1e-9)


def test_without_events_it_never_alarms_and_with_only_events_it_alarms_at_the_kth():
    assert run_length(DESIGN, 2 * grid(DESIGN), 0.0) == math.inf
    assert run_length(DESIGN, 2 * grid(DESIGN), 1.0) == pytest.approx(2.0, rel=1e-12)
    assert run_length(DESIGN, 3 * grid(DESIGN), 1.0) == pytest.approx(3.0, rel=1e-12)


def simulated_run_length(design: Design, h: float, p: float, runs: int, seed: int) -> float:
    """The statistic itself (no grid), ``runs`` copies side by side from 0, each observation an event with
    probability ``p``: the mean number of observations until each copy is at or above h."""
    rng = np.random.default_rng(seed)
    value, steps, done = np.zeros(runs), np.zeros(runs), np.zeros(runs, bool)
    while not done.all():
        events = rng.random(runs) < p
        value = np.where(done, value, np.maximum(0.0, value + np.where(events, design.up, design.down)))
        steps += ~done
        done |= value >= h
    return float(steps.mean())


def test_a_no_event_step_under_one_and_a_half_grid_steps_is_rounded_to_one():
    """p0 = 0.002, p1 = 0.02: the grid is a 120th of the up step (2.303 / 120 = 0.0192), and no event steps down by
    0.0181, 0.95 of a grid step: rounded to 1 step, the in-control run length at h = 3 (two events close together
    alarm) stays within 25% of the statistic's own (a seeded simulation, 400 runs: 3,489; the grid: 3,693); at 2
    steps it would be nearly double (6,657)."""
    design = Design(0.002, 0.02)
    assert -design.down / grid(design) == pytest.approx(0.9485, abs=1e-4)
    h = 3.0
    simulated = simulated_run_length(design, h, 0.002, runs=400, seed=7)
    assert run_length(design, h) == pytest.approx(simulated, rel=0.25)
