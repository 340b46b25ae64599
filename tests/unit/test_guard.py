"""service/guard.py: when the guard engages, when it releases, what it reports; with hand-made audit outcomes.

The figures are computed by hand. The served point was validated at 95% agreement and the margin is 0.05, so the
audits' CUSUM is in control at 5% disagreement and designed for 10%: a disagreement adds log(0.10 / 0.05) =
log 2 = 0.6931, an agreement adds log(0.90 / 0.95) = -0.05407. With one false alarm per 20 audits asked for, one
disagreement is rare enough (it comes once per 20 audits): h = log 2. With one per 21, h must be above log 2: two
disagreements close together (2 log 2 = 1.386) are needed. The inputs' CUSUM is in control at 1% out of
distribution and designed for 5%: log 5 = 1.609 per flagged input, log(0.95 / 0.99) = -0.04124 per other one; one
false alarm per 100 requests asked for: one flagged input (once per 100) is enough, h = log 5.
"""

from __future__ import annotations

import math

import pytest

from service.config import Settings
from service.guard import GUARDING, OFF, WATCHING, Guard, GuardSettings

LN2, LN5 = math.log(2), math.log(5)
AGREE_STEP = math.log(0.90 / 0.95)  # -0.05407
INPUT_STEP = math.log(0.95 / 0.99)  # -0.04124
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
OOD, TYPICAL = 0.001, 0.5  # p-values: below ood_alpha (0.01), and far above it


def make(point="lambda_0.6", min_confidence=None, safety=SAFETY, **settings):
    options = {
        "enabled": True,
        "margin": 0.05,
        "recover_margin": 0.02,
        "window": 20,
        "min_audits": 10,
        "false_alarm_audits": 21,
        "shifted_false_alarm_audits": 20,
        "input_shift_share": 0.05,
        "input_false_alarm_requests": 100,
        "ood_alpha": 0.01,
    } | settings
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


def test_the_thresholds_are_those_computed_by_hand():
    guard, _ = make()
    evidence = guard.describe()["evidence"]
    assert LN2 < evidence["threshold"] <= 2 * LN2 + 12 * AGREE_STEP  # see test_crosses_at_the_audit_computed_by_hand
    assert evidence["shifted_threshold"] == pytest.approx(LN2, abs=1e-6)
    assert evidence["input_threshold"] == pytest.approx(LN5, abs=1e-6)
    assert evidence["engage_at"] == evidence["threshold"]
    assert (evidence["statistic"], evidence["input_statistic"], evidence["inputs_changed"]) == (0.0, 0.0, False)
    assert evidence["false_alarm_audits"] == 21


def test_one_disagreement_is_evidence_enough_when_it_is_rare_enough():
    guard, changes = make(false_alarm_audits=20)  # h = log 2: the first disagreement reaches it exactly
    feed(guard, 30, 0)
    assert guard.state == WATCHING
    guard.record(False)
    assert guard.state == GUARDING
    assert guard.active
    assert guard.min_confidence == 0.5
    assert changes == [("lambda_0.6", "lambda_0.6+min_confidence=0.5", True)]
    assert guard.last_change["statistic"] == pytest.approx(LN2, abs=1e-4)
    assert guard.last_change["agreement"] == 0.95  # the window: 19 agreed of the last 20
    assert guard.last_change["audits"] == 20  # the window's
    assert guard.last_change["inputs_changed"] is False
    assert guard.describe()["recent_audits"] == 0  # the window starts again
    assert guard.describe()["evidence"]["statistic"] == 0.0  # and so does the CUSUM


def test_crosses_at_the_audit_computed_by_hand():
    # disagree, 12 agree, disagree: log 2 + 12 * (-0.05407) + log 2 = 0.7375 >= h (just above log 2): the 14th audit.
    guard, _ = make()
    feed(guard, 0, 1)
    assert guard.state == WATCHING  # log 2 < h
    assert guard.describe()["evidence"]["statistic"] == pytest.approx(LN2, abs=1e-6)
    feed(guard, 12, 0)
    assert guard.describe()["evidence"]["statistic"] == pytest.approx(LN2 + 12 * AGREE_STEP, abs=1e-6)
    assert guard.state == WATCHING
    guard.record(False)
    assert guard.state == GUARDING
    assert guard.last_change["statistic"] == pytest.approx(2 * LN2 + 12 * AGREE_STEP, abs=1e-4)


def test_one_agreement_more_and_the_first_disagreement_is_forgotten():
    # disagree, 13 agree: log 2 - 13 * 0.05407 < 0, floored at 0; a disagreement then is log 2 < h again.
    guard, changes = make()
    feed(guard, 0, 1)
    feed(guard, 13, 0)
    assert guard.describe()["evidence"]["statistic"] == 0.0
    guard.record(False)
    assert guard.state == WATCHING
    assert changes == []
    guard.record(False)  # 2 log 2 - 0.054 * 0 = 1.386: engages
    assert guard.state == GUARDING


def test_changed_inputs_lower_the_threshold_and_one_disagreement_then_engages():
    guard, _ = make()
    guard.observe_input(0.01)  # at ood_alpha: not out of distribution
    assert not guard.inputs_changed
    guard.observe_input(OOD)
    assert guard.inputs_changed
    assert guard.describe()["evidence"]["engage_at"] == pytest.approx(LN2, abs=1e-6)
    guard.record(False)
    assert guard.state == GUARDING
    assert guard.last_change["inputs_changed"] is True


def test_changed_inputs_alone_never_engage():
    guard, changes = make()
    for _ in range(200):
        guard.observe_input(OOD)
    feed(guard, 50, 0)
    assert guard.inputs_changed
    assert guard.state == WATCHING
    assert changes == []


def test_the_inputs_test_is_capped_so_that_the_end_of_a_shift_is_seen():
    # capped at 2 log 5 = 3.219: 3.219 - 39 * 0.04124 = 1.610 >= log 5 (still changed), the 40th: 1.569 < log 5.
    guard, _ = make()
    for _ in range(100):
        guard.observe_input(OOD)
    assert guard.describe()["evidence"]["input_statistic"] == pytest.approx(2 * LN5, abs=1e-6)
    for _ in range(39):
        guard.observe_input(TYPICAL)
    assert guard.inputs_changed
    assert guard.describe()["evidence"]["input_statistic"] == pytest.approx(2 * LN5 + 39 * INPUT_STEP, abs=1e-6)
    guard.observe_input(TYPICAL)
    assert not guard.inputs_changed
    guard.record(False)  # back at the full threshold: one disagreement is not enough
    assert guard.state == WATCHING


def test_without_the_inputs_test_their_p_values_change_nothing():
    guard, _ = make(input_shift_share=0.0)
    for _ in range(50):
        guard.observe_input(OOD)
    assert not guard.inputs_changed
    evidence = guard.describe()["evidence"]
    assert (evidence["input_statistic"], evidence["input_threshold"]) == (None, None)
    guard.record(False)
    assert guard.state == WATCHING


def test_releases_only_at_validated_minus_recover_margin_hysteresis_then_the_cusum_starts_again():
    guard, changes = make(window=20, min_audits=20)
    feed(guard, 0, 2)
    assert guard.active
    # 0.90 is below the release line (0.95 - 0.02 = 0.93): it stays on; disagreements now feed no CUSUM.
    feed(guard, 0, 2)
    feed(guard, 18, 0)
    assert guard.active
    assert guard.describe()["evidence"]["statistic"] == 0.0
    feed(guard, 1, 0)  # the oldest disagreement leaves the window: 19 agreed of 20 = 0.95 >= 0.93
    assert not guard.active
    assert guard.state == WATCHING
    assert changes[-1] == ("lambda_0.6+min_confidence=0.5", "lambda_0.6", False)
    assert guard.changes == 2
    assert guard.last_change["agreement"] == pytest.approx(0.95)
    feed(guard, 0, 1)  # from 0 again: log 2 < h
    assert guard.state == WATCHING
    feed(guard, 0, 1)
    assert guard.state == GUARDING


def test_release_waits_for_min_audits():
    guard, _ = make(window=20, min_audits=10)
    feed(guard, 0, 2)
    feed(guard, 9, 0)  # 9 of 9 agree, under min_audits
    assert guard.active
    feed(guard, 1, 0)  # 10 of 10 = 1.0 >= 0.93
    assert not guard.active


def test_agreement_exactly_at_the_release_line_releases():
    safety = {**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 0.75}}}
    guard, _ = make(safety=safety, margin=0.25, recover_margin=0.125, window=8, min_audits=8, false_alarm_audits=4)
    feed(guard, 0, 1)  # one disagreement in 4 in control: h = log(0.5 / 0.25), the first engages
    assert guard.active
    feed(guard, 4, 3)
    assert guard.active
    feed(guard, 1, 0)  # 5 of 8 = 0.625 = 0.75 - 0.125, exact in binary
    assert not guard.active


def test_a_point_validated_at_full_agreement_is_still_judged_on_a_rate_not_never():
    # in control at 0.1% disagreement (not 0: a validation of 100% is rare, not never), designed for 5.1%: one
    # disagreement (log 51 = 3.93) comes once per 1,000 audits, rarer than one false alarm per 21 asks.
    safety = {**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 1.0}}}
    guard, _ = make(safety=safety)
    assert guard.describe()["evidence"]["threshold"] == pytest.approx(math.log(0.051 / 0.001), abs=1e-6)
    feed(guard, 100, 0)
    assert guard.state == WATCHING
    guard.record(False)
    assert guard.state == GUARDING


def test_a_margin_past_certain_disagreement_is_designed_just_short_of_it():
    safety = {**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 0.5}}}
    guard, _ = make(safety=safety, margin=0.6, recover_margin=0.1)  # p1 = 0.5 + 0.6 > 1: 0.999
    # with 1/p0 = 2 audits per disagreement far from the 21 asked: log(0.999 / 0.5) per disagreement
    assert guard.describe()["evidence"]["threshold"] > math.log(0.999 / 0.5)
    feed(guard, 0, 30)
    assert guard.state == GUARDING


def test_a_server_floor_is_never_loosened_by_the_guard():
    guard, _ = make(min_confidence=0.7)
    assert guard.min_confidence == 0.7
    assert guard.served_policy == "lambda_0.6+min_confidence=0.7"


@pytest.mark.parametrize(
    ("point", "safety", "enabled", "reason"),
    [
        ("lambda_0.6", SAFETY, False, "DYNFUSE_GUARD is off"),
        ("lambda_0.6", {}, True, "no validation safety figures"),
        ("lambda_0.6", {"guard": SAFETY["guard"]}, True, "no validation safety figures"),
        ("lambda_0", SAFETY, True, "no confidence floor"),
        ("lambda_0.6", {**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 0.0}}}, True, "too seldom"),
        ("lambda_0.6", {**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 0.0}}}, False, "GUARD is off"),
        ("lambda_0", {**SAFETY, "operating_points": {"lambda_0": {"agreement": 0.0}}}, True, "no confidence floor"),
    ],
)
def test_off_with_a_reason_and_then_it_never_engages(point, safety, enabled, reason):
    guard, changes = make(point=point, safety=safety, enabled=enabled)
    assert guard.state == OFF
    assert reason in guard.describe()["reason"]
    for _ in range(50):
        guard.observe_input(OOD)
    feed(guard, 0, 50)
    assert guard.state == OFF
    assert changes == []
    # Off, it still says how the audits went.
    assert guard.describe()["recent_agreement"] == 0.0
    assert guard.describe()["recent_audits"] == 20  # the window


# Agreement on validation -> the percentage the reason shows. At most one cheaper answer in a thousand agreeing
# leaves no room below it for the audits' test to detect a fall (it would be in control at 99.9% disagreement,
# the most it is designed for); 0.001 is exactly that edge, 0.0011 is served with the guard watching.
TOO_SELDOM = {"never": (0.0, "0.0"), "under-0.05%": (0.000497, "0.0"), "one-in-a-thousand": (0.001, "0.1")}


@pytest.mark.parametrize(("agreement", "shown"), TOO_SELDOM.values(), ids=TOO_SELDOM.keys())
def test_a_point_that_agreed_at_most_once_in_a_thousand_on_validation_is_off_saying_how_often(agreement, shown):
    guard, _ = make(safety={**SAFETY, "operating_points": {"lambda_0.6": {"agreement": agreement}}})
    assert guard.state == OFF
    assert guard.describe()["reason"] == (
        f"the served point's cheaper answers agreed with the full path {shown}% of the time on validation: too "
        "seldom for a fall in agreement to be measured"
    )


def test_a_point_that_agreed_just_over_once_in_a_thousand_is_watched():
    guard, _ = make(safety={**SAFETY, "operating_points": {"lambda_0.6": {"agreement": 0.0011}}})
    assert guard.state == WATCHING


def test_describe_reports_the_recent_agreement_and_the_lines():
    guard, _ = make(false_alarm_audits=1e6)
    feed(guard, 6, 2)
    state = guard.describe()
    assert state["recent_agreement"] == pytest.approx(0.75)
    assert state["recent_audits"] == 8
    assert state["validated_agreement"] == 0.95
    assert state["engage_below"] == pytest.approx(0.90)
    assert state["release_at"] == pytest.approx(0.93)
    assert state["safer_policy"] == "lambda_0.6+min_confidence=0.5"


def test_the_settings_come_from_the_servers(tmp_path):
    settings = Settings(
        store=tmp_path,
        guard_margin=0.07,
        guard_recover_margin=0.03,
        guard_window=40,
        guard_min_audits=30,
        guard_false_alarm_audits=3000,
        guard_shifted_false_alarm_audits=150,
        guard_input_shift_share=0.04,
        guard_input_false_alarm_requests=9000,
        uncertain_ood_alpha=0.02,
    )
    assert GuardSettings.of(settings, enabled=False) == GuardSettings(
        enabled=False,
        margin=0.07,
        recover_margin=0.03,
        window=40,
        min_audits=30,
        false_alarm_audits=3000,
        shifted_false_alarm_audits=150,
        input_shift_share=0.04,
        input_false_alarm_requests=9000,
        ood_alpha=0.02,
    )


def test_a_shifted_false_alarm_rate_above_the_plain_one_stops_the_server(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DYNFUSE_GUARD_SHIFTED_FALSE_ALARM_AUDITS"):
        Settings(store=tmp_path, guard_false_alarm_audits=100, guard_shifted_false_alarm_audits=101)
    with pytest.raises(ValidationError, match="guard_false_alarm_audits"):
        Settings(store=tmp_path, guard_false_alarm_audits=1)
    assert Settings(store=tmp_path, guard_false_alarm_audits=100, guard_shifted_false_alarm_audits=100)
    assert Settings(store=tmp_path, guard_input_shift_share=0.0).guard_input_shift_share == 0.0


def test_an_ood_alpha_at_or_above_the_input_shift_share_leaves_the_inputs_unused():
    for alpha in (0.05, 1.0):
        guard, _ = make(ood_alpha=alpha)
        assert guard.inputs is None
        guard.observe_input(0.001)
        assert not guard.inputs_changed
    guard, _ = make(ood_alpha=0.0499)
    assert guard.inputs is not None
