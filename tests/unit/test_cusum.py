"""service/cusum.py: the Bernoulli CUSUM's steps, when it crosses, and its thresholds from a false-alarm rate, against
figures computed by hand (the steps are natural logs of ratios of the probabilities; the run lengths are those of
a coin's waiting times) and a seeded simulation of the statistic."""

from __future__ import annotations

import math
import random

import pytest

from service.cusum import Cusum, Design, grid, run_length, threshold

LN2 = 0.6931471805599453  # log(0.2 / 0.1)
LN_8_9 = -0.11778303565638346  # log(0.8 / 0.9)


def test_the_steps_are_the_log_likelihood_ratios():
    design = Design(0.1, 0.2)
    assert design.up == pytest.approx(LN2, abs=1e-12)
    assert design.down == pytest.approx(LN_8_9, abs=1e-12)
    assert design.step(True) == design.up
    assert design.step(False) == design.down
    assert Design(0.0, 0.1).up == math.inf  # an event that never happens in control


@pytest.mark.parametrize(("p0", "p1"), [(0.1, 0.1), (0.2, 0.1), (-0.1, 0.1), (0.1, 1.0)])
def test_a_design_is_a_rise_of_a_probability(p0, p1):
    with pytest.raises(AssertionError, match="a rise of a probability"):
        Design(p0, p1)


def test_the_statistic_crosses_at_the_audit_computed_by_hand():
    # events e, e, no, e: 0.693, 1.386, 1.269, 1.962; with h = 1.9 the 4th crosses, the 3rd does not.
    cusum = Cusum(Design(0.1, 0.2), h=1.9)
    assert [cusum.observe(e) for e in (True, True, False, True)] == [False, False, False, True]
    assert cusum.value == pytest.approx(3 * LN2 + LN_8_9)
    assert cusum.observations == 4
    assert cusum.alarmed
    cusum.reset()
    assert (cusum.value, cusum.observations, cusum.alarmed) == (0.0, 0, False)


def test_the_statistic_is_floored_at_zero_and_capped():
    cusum = Cusum(Design(0.1, 0.2), h=1.0, cap=1.5)
    assert cusum.observe(False) is False
    assert cusum.value == 0.0  # not negative: old agreement is no credit against a change
    cusum.observe(True)
    cusum.observe(False)
    assert cusum.value == pytest.approx(LN2 + LN_8_9)
    for _ in range(5):
        cusum.observe(True)
    assert cusum.value == 1.5
    # from the cap, (1.5 - 1.0) / 0.1178 = 4.2 steps down: the 5th no-event goes below h
    assert [cusum.observe(False) for _ in range(5)] == [True, True, True, True, False]


def test_at_most_one_step_above_zero_the_first_event_alarms_so_arl0_is_one_over_p0():
    design = Design(0.1, 0.2)
    assert run_length(design, 0.5) == pytest.approx(10.0)
    assert run_length(design, LN2) == pytest.approx(10.0)  # h = the event's step: one event reaches it
    assert run_length(design, 0.5, p=0.25) == pytest.approx(4.0)
    assert run_length(design, 0.0) == 1.0
    assert threshold(design, 10.0) == design.up  # one event is rare enough
    assert threshold(design, 8.0) == design.up


def test_two_events_in_a_row_is_a_coins_two_heads_in_a_row():
    # p0 = 0.5, p1 = 0.6: up = log 1.2 = 0.182, down = log 0.8 = -0.223: a no-event after one event is back at 0, so
    # with up < h <= 2 up the alarm is two events in a row, on average (1 + p) / p^2 = 6 observations at p = 0.5.
    design = Design(0.5, 0.6)
    assert run_length(design, 0.3) == pytest.approx(6.0)
    assert run_length(design, 0.3, p=0.25) == pytest.approx((1 + 0.25) / 0.25**2)
    h = threshold(design, 5.0)  # the smallest h with ARL0 >= 5: just above one step
    assert math.log(1.2) < h <= 2 * math.log(1.2)
    assert run_length(design, h) == pytest.approx(6.0)


def test_a_validated_rate_of_zero_alarms_at_the_first_event():
    design = Design(0.0, 0.05)
    assert threshold(design, 1000) == 0.0
    assert run_length(design, 1.0) == math.inf
    assert run_length(design, 1.0, p=0.2) == pytest.approx(5.0)
    cusum = Cusum(design, threshold(design, 1000))
    assert cusum.observe(False) is False
    assert cusum.observe(True) is True


@pytest.mark.parametrize(("p0", "p1", "arl0"), [(0.098, 0.158, 400), (0.01, 0.05, 300)])
def test_the_threshold_gives_the_false_alarm_rate_asked_for_in_a_simulation(p0, p1, arl0):
    design = Design(p0, p1)
    h = threshold(design, arl0)
    computed = run_length(design, h)
    assert computed >= arl0  # and close to it: ARL0 moves in jumps (a whole event more or less), not smoothly
    assert computed < 1.5 * arl0
    draw = random.Random(1)
    lengths = []
    for _ in range(2000):
        cusum, n = Cusum(design, h), 1
        while not cusum.observe(draw.random() < p0):
            n += 1
        lengths.append(n)
    mean = sum(lengths) / len(lengths)
    # the mean of 2,000 run lengths (roughly geometric: a standard error of about 2.2% of the mean), and the grid's
    # rounding of the steps (a few percent): within 12% of the computed ARL0
    assert mean == pytest.approx(computed, rel=0.12)


@pytest.mark.parametrize("arl0", [10_000, 1e9])
def test_thresholds_stay_under_walds_bound_even_on_the_coarser_grid_of_a_very_rare_alarm(arl0):
    # Wald: ARL0 >= exp(h) for a CUSUM of log-likelihood ratios, so ARL0 = arl0 needs h <= log(arl0) at most.
    design = Design(0.098, 0.158)
    h = threshold(design, arl0)
    assert h <= math.log(arl0)
    assert run_length(design, h) >= arl0


def test_the_grid_resolves_the_smaller_step_twelve_times_unless_the_larger_would_need_over_120_or_h_over_1000():
    assert grid(Design(0.1, 0.2), 1.0) == pytest.approx(-LN_8_9 / 12)  # 0.0098 > log 2 / 120 = 0.0058
    assert grid(Design(0.01, 0.05), 1.0) == pytest.approx(math.log(5) / 120)  # 0.0134 > 0.0412 / 12 = 0.0034
    assert grid(Design(0.8, 0.9), 1.0) == pytest.approx(math.log(0.9 / 0.8) / 12)  # the event's step is the smaller
    assert grid(Design(0.1, 0.2), 50.0) == pytest.approx(0.05)  # 1,000 states at most


def test_a_threshold_of_exactly_one_events_step_on_the_grid_alarms_at_the_first_event():
    design = Design(0.01, 0.05)  # the grid is the event's step / 120: h = up is exactly 120 steps
    assert run_length(design, design.up) == pytest.approx(100.0)


def test_without_events_the_statistic_never_alarms():
    assert run_length(Design(0.1, 0.2), 1.0, p=0.0) == math.inf
