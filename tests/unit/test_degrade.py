"""Degrading instead of refusing: on at the high-water mark, off at the low one, seconds reported as they pass."""

from __future__ import annotations

import pytest

from service.degrade import DegradeController


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def controller(clock, seconds):
    return DegradeController("lambda_0.8", high_water=8, low_water=2, on_seconds=seconds.append, clock=clock)


def test_it_degrades_from_the_high_water_mark_until_the_queue_drains_below_the_low_one():
    clock, seconds = Clock(), []
    degrade = controller(clock, seconds)

    assert [degrade.update(q) for q in (0, 5, 7)] == [False, False, False]
    assert degrade.update(8) is True  # the high-water mark
    clock.now += 1.5
    assert degrade.update(5) is True  # between the marks: stays degraded (no flapping)
    clock.now += 0.5
    assert degrade.update(2) is False  # the low-water mark
    assert sum(seconds) == pytest.approx(2.0)
    assert degrade.update(5) is False  # between the marks again, from below: stays normal


def test_no_cheaper_point_means_never_degrading():
    never = DegradeController(None, high_water=2, low_water=1)
    assert never.update(1000) is False


def test_a_spell_still_running_at_shutdown_is_counted():
    clock, seconds = Clock(), []
    degrade = controller(clock, seconds)
    degrade.update(9)
    clock.now += 3.0
    degrade.close()
    assert seconds == [3.0]
    assert not degrade.degraded


@pytest.mark.parametrize(("high", "low"), [(4, 4), (4, 5)])
def test_water_marks_without_a_gap_between_them_are_refused(high, low):
    with pytest.raises(AssertionError, match=f"low water {low} must be below high water {high}"):
        DegradeController("lambda_0.8", high_water=high, low_water=low)
