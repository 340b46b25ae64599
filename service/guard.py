"""The guard: when the served operating point's answers stop agreeing with the full path, serve a safer policy.

Shadow audits (service/audit.py) say, for a sample of the answers a cheaper expert gave, whether the full path
answers the same. On validation each operating point's cheaper answers agreed with the full path some share of
the time (model.json ``safety.operating_points``, measured at export). The guard keeps the last ``window``
audit outcomes of the served point and:

- engages when, over at least ``min_audits`` of them, agreement falls below the validated figure minus
  ``margin``: requests that name no operating point and no confidence floor are then served with the point's
  safer policy, a confidence floor chosen on validation at export (model.json ``safety.guard``): the full path
  runs too whenever the cheaper expert is unsure, and the answer says ``route.guarded: true``;
- releases when agreement is back at or above the validated figure minus ``recover_margin`` (smaller than
  ``margin``: the gap between the two is the hysteresis), again over at least ``min_audits`` fresh outcomes.

The window starts empty after every change, so each decision rests on audits made since the last one. The
audits keep measuring the router's own picks while the guard is on (a floor does not change which expert the
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

logger = logging.getLogger("dynfuse")

OFF, WATCHING, GUARDING = "off", "watching", "guarding"


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool
    margin: float  # engage below validated agreement minus this
    recover_margin: float  # release at or above validated agreement minus this (< margin)
    window: int  # audit outcomes kept
    min_audits: int  # outcomes needed before either decision


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
        self.reason = self._why_off(settings, safer)
        self.state = OFF if self.reason else WATCHING
        self.outcomes: deque[bool] = deque(maxlen=settings.window)
        self.changes = 0
        self.since = _now()  # when it entered its state
        self.last_change: dict | None = None

    @staticmethod
    def _why_off(settings: GuardSettings, safer: dict) -> str | None:
        if not settings.enabled:
            return "DYNFUSE_GUARD is off"
        if not safer:
            return "the model has no validation safety figures (exported before them, or without a validation split)"
        if safer.get("min_confidence") is None:
            return "no confidence floor made the served point safer on validation"
        return None

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

    def record(self, agreed: bool) -> None:
        """One audit outcome of the served operating point: does the router's pick agree with the full path?
        An off guard keeps the recent agreement too (GET /v1/models/{name} shows it), and never changes."""
        self.outcomes.append(bool(agreed))
        if self.state == OFF or len(self.outcomes) < self.settings.min_audits:
            return
        agreement = self.recent_agreement
        if self.state == WATCHING and agreement < self.engage_below:
            self._change(GUARDING, agreement)
        elif self.state == GUARDING and agreement >= self.release_at:
            self._change(WATCHING, agreement)

    def _change(self, state: str, agreement: float) -> None:
        before, after = (
            (self.served_policy, self.safer_policy) if state == GUARDING else (self.safer_policy, self.served_policy)
        )
        audits = len(self.outcomes)
        self.state = state
        self.changes += 1
        self.since = _now()
        self.outcomes.clear()
        self.last_change = {
            "from": before,
            "to": after,
            "at": self.since,
            "agreement": round(agreement, 4),
            "audits": audits,
        }
        logger.warning(
            "guard of %s: %s -> %s: %d audits agreed with the full path %.1f%% of the time (validated %.1f%%, %s "
            "below %.1f%%, released at %.1f%%)",
            self.model,
            before,
            after,
            audits,
            100 * agreement,
            100 * self.validated_agreement,
            "engaging" if state == GUARDING else "releasing: it was",
            100 * self.engage_below,
            100 * self.release_at,
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
            "changes": self.changes,
            "since": self.since,
            "last_change": self.last_change,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
