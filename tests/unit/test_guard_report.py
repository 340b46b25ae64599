"""What the guard reports (GET /v1/models/{name}'s ``safety.guard``) and logs, field by field, and its lines exactly
at their values: figures chosen to be exact in binary (validated 0.75, margins 0.25 and 0.125, a window of 8), so
"at the line" is the line and not a rounding of it. The audits' CUSUM is in control at 25% disagreement and designed
for 50%: a disagreement adds log 2, an agreement log(0.5 / 0.75) = log(2/3); one false alarm per 4 audits asked for,
so one disagreement (once per 4 audits in control) reaches h = log 2."""

from __future__ import annotations

import logging
import re

from service.guard import GUARDING, OFF, WATCHING, Guard, GuardSettings

POINT = "lambda_0.6"
SAFER = f"{POINT}+min_confidence=0.5"
VALIDATION = {"accuracy": 0.9, "agreement": 0.97, "saved_ratio": 0.4}
SAFETY = {
    "operating_points": {POINT: {"agreement": 0.75}, "lambda_0": {"agreement": 0.99}},
    "guard": {
        POINT: {"operating_point": POINT, "min_confidence": 0.5, "policy": SAFER, "validation": VALIDATION},
        "lambda_0": {"operating_point": "lambda_0", "min_confidence": None, "policy": None},
    },
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def make(point=POINT, safety=SAFETY, **settings) -> Guard:
    options = {
        "enabled": True,
        "margin": 0.25,
        "recover_margin": 0.125,
        "window": 8,
        "min_audits": 8,
        "false_alarm_audits": 4,
        "shifted_false_alarm_audits": 4,
        "input_shift_share": 0.0,
        "input_false_alarm_requests": 100,
        "ood_alpha": 0.01,
    } | settings
    return Guard(
        model="shapes", operating_point=point, min_confidence=None, safety=safety, settings=GuardSettings(**options)
    )


def feed(guard: Guard, *outcomes: int) -> None:
    for outcome in outcomes:
        guard.record(bool(outcome))


def test_agreement_exactly_at_the_release_line_releases():
    guard = make()
    feed(guard, 1, 1, 1, 1)
    assert guard.state == WATCHING
    feed(guard, 0)  # the first disagreement: log 2 >= h
    assert guard.state == GUARDING
    feed(guard, 1, 1, 1, 1, 0, 0, 0, 1)  # a fresh window: 5 of 8 = 0.625, the release line itself
    assert guard.state == WATCHING


def test_what_the_guard_reports_while_watching_and_after_engaging_and_releasing(caplog):
    guard = make()
    before = guard.describe()
    assert ISO_UTC.match(before.pop("since")), "since: an ISO time in UTC"
    assert before == {
        "enabled": True,
        "state": WATCHING,
        "active": False,
        "reason": None,
        "operating_point": POINT,
        "served_policy": POINT,
        "safer_policy": SAFER,
        "safer_min_confidence": 0.5,
        "safer_validation": VALIDATION,
        "validated_agreement": 0.75,
        "engage_below": 0.5,
        "release_at": 0.625,
        "recent_agreement": None,
        "recent_audits": 0,
        "window": 8,
        "min_audits": 8,
        "evidence": {
            "statistic": 0.0,
            "engage_at": 0.693147,
            "threshold": 0.693147,
            "shifted_threshold": 0.693147,
            "false_alarm_audits": 4,
            "inputs_changed": False,
            "input_statistic": None,
            "input_threshold": None,
        },
        "changes": 0,
        "last_change": None,
    }

    with caplog.at_level(logging.WARNING, logger="dynfuse"):
        feed(guard, 1, 1, 0)  # 2 of 3: the disagreement engages
        engaged = guard.describe()
        feed(guard, 1, 1, 1, 1, 1, 1, 1, 0)  # 7 of 8 = 87.5%
        released = guard.describe()

    assert (engaged["state"], engaged["active"], engaged["changes"], engaged["recent_audits"]) == (GUARDING, True, 1, 0)
    change = engaged["last_change"]
    assert ISO_UTC.match(change.pop("at"))
    assert change == {
        "from": POINT,
        "to": SAFER,
        "agreement": 0.6667,
        "audits": 3,
        "statistic": 0.6931,
        "inputs_changed": False,
    }
    assert (released["state"], released["active"], released["changes"]) == (WATCHING, False, 2)
    change = released["last_change"]
    assert change.pop("at") == released["since"]
    assert change == {
        "from": SAFER,
        "to": POINT,
        "agreement": 0.875,
        "audits": 8,
        "statistic": 0.0,  # not fed while guarding
        "inputs_changed": False,
    }
    assert [r.getMessage() for r in caplog.records] == [
        f"guard of shapes: {POINT} -> {SAFER}: 3 audits agreed with the full path 66.7% of the time (validated "
        "75.0%): their CUSUM reached 0.69 (engages at 0.69; designed to detect 50.0%)",
        f"guard of shapes: {SAFER} -> {POINT}: 8 audits agreed with the full path 87.5% of the time (validated "
        "75.0%): at or above the release line 62.5%",
    ]


def test_figures_are_reported_to_six_places_and_a_change_to_four():
    guard = make(window=9, min_audits=9)
    feed(guard, 1, 1, 0)  # engages at 2 of 3
    assert guard.last_change["agreement"] == 0.6667
    feed(guard, 1, 0, 0)
    assert guard.describe()["recent_agreement"] == 0.333333


def test_changed_inputs_say_so_in_the_log(caplog):
    guard = make(input_shift_share=0.05, input_false_alarm_requests=100, false_alarm_audits=100)
    guard.observe_input(0.001)  # one flagged input: log 5 reaches the inputs' h (one per 100 requests in control)
    with caplog.at_level(logging.WARNING, logger="dynfuse"):
        feed(guard, 0)
    assert guard.state == GUARDING
    assert guard.last_change["inputs_changed"] is True
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith(
        "their CUSUM reached 0.69 (engages at 0.69, lowered: the inputs changed; designed to detect 50.0%)"
    )


def test_off_says_exactly_why_and_reports_no_safer_policy():
    off = make(enabled=False).describe()
    assert (off["state"], off["reason"]) == (OFF, "DYNFUSE_GUARD is off")
    bare = make(safety={}).describe()
    assert bare["reason"] == (
        "the model has no validation safety figures (exported before them, or without a validation split)"
    )
    assert bare["validated_agreement"] is None and bare["engage_below"] is None  # noqa: PT018
    no_floor = make(point="lambda_0").describe()
    assert no_floor["reason"] == "no confidence floor made the served point safer on validation"
    assert (no_floor["safer_policy"], no_floor["safer_min_confidence"], no_floor["safer_validation"]) == (
        None,
        None,
        None,
    )
