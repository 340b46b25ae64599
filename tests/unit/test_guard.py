"""service/guard.py: when the guard engages, when it releases, what it reports; with hand-made audit outcomes."""

from __future__ import annotations

import pytest

from service.guard import GUARDING, OFF, WATCHING, Guard, GuardSettings

SAFETY = {
    "operating_points": {"lambda_0.6": {"agreement": 0.95}, "lambda_0": {"agreement": 0.99}},
    "guard": {
        "lambda_0.6": {
            "operating_point": "lambda_0.6",
            "min_confidence": 0.5,
            "policy": "lambda_0.6+min_confidence=0.5",
        },
        "lambda_0": {"operating_point": "lambda_0", "min_confidence": None, "policy": None},
    },
}


def make(point="lambda_0.6", min_confidence=None, safety=SAFETY, **settings):
    options = {"enabled": True, "margin": 0.05, "recover_margin": 0.02, "window": 20, "min_audits": 10} | settings
    changes = []
    guard = Guard(
        model="m",
        operating_point=point,
        min_confidence=min_confidence,
        safety=safety,
        settings=GuardSettings(**options),
        on_change=lambda before, after, active: changes.append((before, after, active)),
    )
    return guard, changes


def feed(guard: Guard, agreed: int, disagreed: int) -> None:
    for outcome in [True] * agreed + [False] * disagreed:
        guard.record(outcome)


def test_engages_below_validated_minus_margin_once_enough_audits_agree_that_it_is():
    guard, changes = make()
    assert guard.state == WATCHING
    assert not guard.active
    feed(guard, 0, 9)  # 9 disagreements: under min_audits (10), no decision yet
    assert guard.state == WATCHING
    guard.record(True)  # 10 audits, agreement 0.1 < 0.95 - 0.05
    assert guard.active
    assert guard.state == GUARDING
    assert guard.min_confidence == 0.5
    assert changes == [("lambda_0.6", "lambda_0.6+min_confidence=0.5", True)]
    assert guard.last_change["agreement"] == pytest.approx(0.1)
    assert guard.describe()["recent_audits"] == 0  # the window starts again


def test_agreement_exactly_at_the_engage_line_does_not_engage():
    guard, changes = make(window=20, min_audits=20)
    feed(guard, 18, 2)  # 0.90 == 0.95 - 0.05: not below
    assert guard.state == WATCHING
    assert changes == []
    guard.record(False)  # window slides: 17 agreed of 20 = 0.85
    assert guard.state == GUARDING


def test_releases_only_at_validated_minus_recover_margin_hysteresis():
    guard, changes = make(window=20, min_audits=20)
    feed(guard, 0, 20)
    assert guard.active
    # 0.90 is above the engage line but below the release line (0.93): it stays on.
    feed(guard, 0, 2)
    feed(guard, 18, 0)
    assert guard.active
    feed(guard, 1, 0)  # the oldest disagreement leaves the window: 19 agreed of 20 = 0.95 >= 0.93
    assert not guard.active
    assert guard.state == WATCHING
    assert changes[-1] == ("lambda_0.6+min_confidence=0.5", "lambda_0.6", False)
    assert guard.changes == 2


def test_a_server_floor_is_never_loosened_by_the_guard():
    guard, _ = make(min_confidence=0.7)
    assert guard.min_confidence == 0.7
    assert guard.served_policy == "lambda_0.6+min_confidence=0.7"


@pytest.mark.parametrize(
    ("point", "safety", "enabled", "reason"),
    [
        ("lambda_0.6", SAFETY, False, "DYNFUSE_GUARD is off"),
        ("lambda_0.6", {}, True, "no validation safety figures"),
        ("lambda_0", SAFETY, True, "no confidence floor"),
    ],
)
def test_off_with_a_reason_and_then_it_never_engages(point, safety, enabled, reason):
    guard, changes = make(point=point, safety=safety, enabled=enabled)
    assert guard.state == OFF
    assert reason in guard.describe()["reason"]
    feed(guard, 0, 50)
    assert guard.state == OFF
    assert changes == []
    # Off, it still says how the audits went.
    assert guard.describe()["recent_agreement"] == 0.0
    assert guard.describe()["recent_audits"] == 20  # the window


def test_describe_reports_the_recent_agreement_and_the_lines():
    guard, _ = make()
    feed(guard, 6, 2)
    state = guard.describe()
    assert state["recent_agreement"] == pytest.approx(0.75)
    assert state["recent_audits"] == 8
    assert state["validated_agreement"] == 0.95
    assert state["engage_below"] == pytest.approx(0.90)
    assert state["release_at"] == pytest.approx(0.93)
    assert state["safer_policy"] == "lambda_0.6+min_confidence=0.5"
