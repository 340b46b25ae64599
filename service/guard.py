"""The guard: when the served operating point's answers stop agreeing with the full path, serve a safer policy.

Shadow audits (service/audit.py) say, for a sample of the answers a cheaper expert gave, whether the full path
answers the same. On validation each operating point's cheaper answers agreed with the full path some share of
the time (model.json ``safety.operating_points``, measured at export). The guard:

- engages when the audits give evidence that the served point's disagreement with the full path has risen: a
  one-sided Bernoulli CUSUM on the audit outcomes (service/cusum.py), in control at the validated disagreement
  (1 - validated agreement) and designed to detect agreement ``margin`` lower, crosses its threshold. The
  threshold is set from a target false-alarm rate: ``false_alarm_audits``, the audits on average between false
  engagements while agreement is at its validated figure. Requests that name no operating point and no
  confidence floor are then served with the point's safer policy, a confidence floor chosen on validation at
  export (model.json ``safety.guard``): the full path runs too whenever the cheaper expert is unsure, and the
  answer says ``route.guarded: true``;
- engages sooner when the inputs clearly changed: every request the served point's router decides says whether
  its input is out of distribution (its p-value below ``ood_alpha``: in control about ``ood_alpha`` of
  requests, by construction, models/ood.py). A second CUSUM, on those flags (designed to detect a share of
  ``input_shift_share``, its threshold from ``input_false_alarm_requests``), says whether the inputs changed;
  while it is up, the audits' CUSUM engages at a lower threshold, set from ``shifted_false_alarm_audits``.
  Engaging still rests on the audits: changed inputs alone never engage;
- releases when agreement over at least ``min_audits`` audit outcomes since it engaged (the last ``window``) is
  back at or above the validated figure minus ``recover_margin`` (smaller than ``margin``: the gap is the
  hysteresis). The audits' CUSUM starts again from 0 after every change.

The audits keep measuring the router's own picks while the guard is on (a floor does not change which expert the
router picks, and the pipeline keeps the cheaper expert's answer when it falls back), so the guard sees the
shift end. Each change is logged and counted (``dynfuse_guard_changes_total``), and ``dynfuse_guard_active``
says whether it is on. Every worker process guards its own traffic.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from models.safety import policy_name
from service.cusum import Cusum, Design, threshold

logger = logging.getLogger("dynfuse")

OFF, WATCHING, GUARDING = "off", "watching", "guarding"
MIN_DISAGREEMENT = 0.001  # the in-control disagreement of a point validated at 100% agreement: rare, not never
INPUT_CAP = 2.0  # the inputs' CUSUM is capped at this many times its threshold: a long shift is forgotten as fast


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool
    margin: float  # engage below validated agreement minus this
    recover_margin: float  # release at or above validated agreement minus this (< margin)
    window: int  # audit outcomes kept
    min_audits: int  # outcomes since engaging needed before releasing
    false_alarm_audits: float  # audits, on average, between false engagements at the validated agreement
    shifted_false_alarm_audits: float  # the same, while the inputs changed (a lower threshold)
    input_shift_share: float  # share of out-of-distribution inputs the inputs' CUSUM detects; 0: not used
    input_false_alarm_requests: float  # requests, on average, between false "inputs changed" in control
    ood_alpha: float  # an input is out of distribution below this p-value (in control: this share)

    @classmethod
    def of(cls, settings, *, enabled: bool) -> GuardSettings:
        """From the server's settings (service/config.py's ``Settings``)."""
        return cls(
            enabled=enabled,
            margin=settings.guard_margin,
            recover_margin=settings.guard_recover_margin,
            window=settings.guard_window,
            min_audits=settings.guard_min_audits,
            false_alarm_audits=settings.guard_false_alarm_audits,
            shifted_false_alarm_audits=settings.guard_shifted_false_alarm_audits,
            input_shift_share=settings.guard_input_shift_share,
            input_false_alarm_requests=settings.guard_input_false_alarm_requests,
            ood_alpha=settings.uncertain_ood_alpha,
        )


class Guard:
    def __init__(
        self,
        *,
        model: str,
        operating_point: str,
        min_confidence: float | None,
        safety: dict,
        settings: GuardSettings,
        on_change: Callable[[str, str, bool], None] = lambda _from, _to, _active: None,
    ):
        """``operating_point`` and ``min_confidence``: the policy served to requests that name neither (the
        server's settings); ``safety``: model.json's ``safety`` section; ``on_change(from, to, active)``: told of
        every change (metrics)."""
        self.model = model
        self.operating_point = operating_point
        self.settings = settings
        self.on_change = on_change
        self.served_policy = policy_name(operating_point, min_confidence)
        point = safety.get("operating_points", {}).get(operating_point, {})
        safer = safety.get("guard", {}).get(operating_point, {})
        self.validated_agreement: float | None = point.get("agreement")
        floor = safer.get("min_confidence")
        if floor is not None and min_confidence is not None:
            floor = max(floor, min_confidence)  # never looser than what the server serves anyway
        self.min_confidence: float | None = floor
        self.safer_policy = policy_name(operating_point, floor) if floor is not None else None
        self.safer_validation = safer.get("validation")
        self.reason = self._why_off(settings, safer, self.validated_agreement)
        self.state = OFF if self.reason else WATCHING
        self.outcomes: deque[bool] = deque(maxlen=settings.window)
        self.evidence, self.shifted_h, self.inputs = self._tests(settings, self.validated_agreement)
        self.changes = 0
        self.since = _now()  # when it entered its state
        self.last_change: dict | None = None

    @staticmethod
    def _why_off(settings: GuardSettings, safer: dict, validated: float | None) -> str | None:
        if not settings.enabled:
            return "DYNFUSE_GUARD is off"
        if not safer or validated is None:
            return "the model has no validation safety figures (exported before them, or without a validation split)"
        if safer.get("min_confidence") is None:
            return "no confidence floor made the served point safer on validation"
        if Guard._audit_design(settings, validated) is None:
            return (
                f"the served point's cheaper answers agreed with the full path {100 * validated:.1f}% of the time on "
                "validation: too seldom for a fall in agreement to be measured"
            )
        return None

    @staticmethod
    def _audit_design(settings: GuardSettings, validated: float) -> Design | None:
        """The audits' test: in control at the validated disagreement, designed for agreement ``margin`` lower (at
        most 99.9% disagreement); None when the point agreed too seldom on validation to fall further (a model whose
        cheaper answers all disagreed there, as a small bring-your-own validation split can give)."""
        p0 = max(1.0 - validated, MIN_DISAGREEMENT)
        p1 = min(p0 + settings.margin, 0.999)
        return Design(p0, p1) if p0 < p1 else None

    @staticmethod
    def _tests(settings: GuardSettings, validated: float | None) -> tuple[Cusum | None, float | None, Cusum | None]:
        """(the audits' CUSUM on disagreements, its threshold while the inputs changed, the inputs' CUSUM on
        out-of-distribution flags or None when not used)."""
        design = None if validated is None else Guard._audit_design(settings, validated)
        if design is None:
            return None, None, None
        evidence = Cusum(design, threshold(design, settings.false_alarm_audits))
        shifted_h = min(evidence.h, threshold(design, settings.shifted_false_alarm_audits))
        if settings.input_shift_share <= settings.ood_alpha:
            return evidence, shifted_h, None
        inputs = Design(settings.ood_alpha, settings.input_shift_share)
        h = threshold(inputs, settings.input_false_alarm_requests)
        return evidence, shifted_h, Cusum(inputs, h, cap=INPUT_CAP * h)

    @property
    def active(self) -> bool:
        return self.state == GUARDING

    @property
    def recent_agreement(self) -> float | None:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else None

    @property
    def engage_below(self) -> float | None:
        return None if self.validated_agreement is None else self.validated_agreement - self.settings.margin

    @property
    def release_at(self) -> float | None:
        return None if self.validated_agreement is None else self.validated_agreement - self.settings.recover_margin

    @property
    def inputs_changed(self) -> bool:
        return self.inputs is not None and self.inputs.alarmed

    @property
    def engage_at(self) -> float | None:
        """The audits' CUSUM engages at or above this now (lower while the inputs changed)."""
        if self.evidence is None:
            return None
        return self.shifted_h if self.inputs_changed else self.evidence.h

    def observe_input(self, ood_pvalue: float) -> None:
        """One request the served point's router decided, with its input's out-of-distribution p-value
        (models/ood.py): out of distribution below ``ood_alpha``."""
        if self.inputs is not None:
            self.inputs.observe(ood_pvalue < self.settings.ood_alpha)

    def record(self, agreed: bool) -> None:
        """One audit outcome of the served operating point: does the router's pick agree with the full path?
        An off guard keeps the recent agreement too (GET /v1/models/{name} shows it), and never changes."""
        self.outcomes.append(bool(agreed))
        if self.state == OFF:
            return
        if self.state == WATCHING:
            self.evidence.observe(not agreed)
            if self.evidence.value >= self.engage_at:
                self._change(GUARDING, self.recent_agreement)
        elif len(self.outcomes) >= self.settings.min_audits and self.recent_agreement >= self.release_at:
            self._change(WATCHING, self.recent_agreement)

    def _change(self, state: str, agreement: float) -> None:
        before, after = (
            (self.served_policy, self.safer_policy) if state == GUARDING else (self.safer_policy, self.served_policy)
        )
        audits = len(self.outcomes)
        statistic = self.evidence.value
        self.state = state
        self.changes += 1
        self.since = _now()
        self.outcomes.clear()
        self.evidence.reset()
        self.last_change = {
            "from": before,
            "to": after,
            "at": self.since,
            "agreement": round(agreement, 4),
            "audits": audits,
            "statistic": round(statistic, 4),
            "inputs_changed": self.inputs_changed,
        }
        if state == GUARDING:
            why = (
                f"their CUSUM reached {statistic:.2f} (engages at {self.engage_at:.2f}"
                f"{', lowered: the inputs changed' if self.inputs_changed else ''}; designed to detect "
                f"{100 * self.engage_below:.1f}%)"
            )
        else:
            why = f"at or above the release line {100 * self.release_at:.1f}%"
        logger.warning(
            "guard of %s: %s -> %s: %d audits agreed with the full path %.1f%% of the time (validated %.1f%%): %s",
            self.model,
            before,
            after,
            audits,
            100 * agreement,
            100 * self.validated_agreement,
            why,
        )
        self.on_change(before, after, state == GUARDING)

    def describe(self) -> dict:
        """The guard's state for GET /v1/models/{name}."""
        agreement = self.recent_agreement
        return {
            "enabled": self.settings.enabled,
            "state": self.state,
            "active": self.active,
            "reason": self.reason,
            "operating_point": self.operating_point,
            "served_policy": self.served_policy,
            "safer_policy": self.safer_policy,
            "safer_min_confidence": self.min_confidence,
            "safer_validation": self.safer_validation,
            "validated_agreement": self.validated_agreement,
            "engage_below": _rounded(self.engage_below),
            "release_at": _rounded(self.release_at),
            "recent_agreement": _rounded(agreement),
            "recent_audits": len(self.outcomes),
            "window": self.settings.window,
            "min_audits": self.settings.min_audits,
            "evidence": self._describe_evidence(),
            "changes": self.changes,
            "since": self.since,
            "last_change": self.last_change,
        }

    def _describe_evidence(self) -> dict | None:
        """The sequential tests' state: the audits' CUSUM against its thresholds, and whether the inputs changed."""
        if self.evidence is None:
            return None
        return {
            "statistic": _rounded(self.evidence.value),
            "engage_at": _rounded(self.engage_at),
            "threshold": _rounded(self.evidence.h),
            "shifted_threshold": _rounded(self.shifted_h),
            "false_alarm_audits": self.settings.false_alarm_audits,
            "inputs_changed": self.inputs_changed,
            "input_statistic": None if self.inputs is None else _rounded(self.inputs.value),
            "input_threshold": None if self.inputs is None else _rounded(self.inputs.h),
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
