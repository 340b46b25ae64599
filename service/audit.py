"""Shadow audits: a sample of the answers a cheaper expert gave, re-run on the full path, in spare capacity.

Which answers: those the router picked a cheaper expert for (route ``auto``, both modalities present, decided by
the router, with or without a confidence fallback after it): the population each operating point's validation
agreement was measured on (models/safety.py). Each is audited with probability ``DYNFUSE_AUDIT_RATE``.

When: after the response has been sent (the routes hand ``after_response`` to the response as a background
task), and then only in the micro-batcher's spare capacity (service/batcher.py): an audit never sits in front of
a request, and under load audits wait, then are dropped, oldest first, each counted as ``dropped``.

What: the router's pick's answer against the full path's answer to the same input. When a confidence fallback
already ran the full path for the request, both answers are known and the audit costs nothing; otherwise the
full path runs on the request's own preprocessed input, and what that costs is counted in
``dynfuse_audit_madds_total``, apart from the requests' compute, so the compute-saved panels stay honest.

The outcomes are counted per picked expert and operating point (``dynfuse_audits_total``: agreement is a PromQL
ratio) and those of the point the guard watches go to the guard (service/guard.py), as does, for every request
that point's router decided (audited or not), its out-of-distribution p-value: whether the inputs changed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from export.pipeline import AUTO, PipelineInput, PipelineOutput
from service.batcher import MicroBatcher
from service.guard import Guard
from service.metrics import Metrics

logger = logging.getLogger("dynfuse")

AUDITED_DECISIONS = ("router", "confidence")  # the router picked; a fallback after it keeps the pick's answer


class Auditor:
    def __init__(
        self,
        *,
        full_expert: str,
        batcher: MicroBatcher,
        metrics: Metrics,
        guard: Guard,
        rate: float,
        rng: random.Random | None = None,
    ):
        self.full_expert = full_expert
        self.batcher = batcher
        self.metrics = metrics
        self.guard = guard
        self.rate = rate
        self.rng = rng or random.Random()
        self.counts = {"agreed": 0, "disagreed": 0, "dropped": 0}

    def after_response(self, items: list[PipelineInput], outputs: list[PipelineOutput]) -> None:
        """Consider every answer of a call for an audit; called once the response was sent."""
        if self.rate <= 0:
            return
        for item, output in zip(items, outputs, strict=True):
            if self.router_decided(item, output) and output.operating_point == self.guard.operating_point:
                self.guard.observe_input(output.ood_pvalue)  # whether the inputs changed: every routed request
            pick = self.router_pick(item, output)
            if pick is None or self.rng.random() >= self.rate:
                continue
            if output.fallback_label is not None:  # the full path already ran for this request
                self.record(pick, output.operating_point, output.fallback_label == output.label)
                continue
            self.batcher.offer_spare(_AuditJob(self, _full_path_input(item, self.full_expert), pick, output))

    @staticmethod
    def router_decided(item: PipelineInput, output: PipelineOutput) -> bool:
        """Whether the router picked this answer's expert (route ``auto``, both modalities): the population audited."""
        if item.route != AUTO or item.token_ids is None or item.image is None:
            return False
        return output.decided_by in AUDITED_DECISIONS

    def router_pick(self, item: PipelineInput, output: PipelineOutput) -> str | None:
        """The cheaper expert the router picked for this answer, when it is one an audit measures; else None."""
        if not self.router_decided(item, output):
            return None
        pick = output.fallback_from if output.fallback_from is not None else output.expert
        return None if pick == self.full_expert else pick

    def record(self, expert: str, operating_point: str, agreed: bool) -> None:
        outcome = "agreed" if agreed else "disagreed"
        self.counts[outcome] += 1
        self.metrics.audits.labels(self.metrics.model, expert, operating_point, outcome).inc()
        if operating_point == self.guard.operating_point:
            self.guard.record(agreed)

    def dropped(self, expert: str, operating_point: str) -> None:
        self.counts["dropped"] += 1
        self.metrics.audits.labels(self.metrics.model, expert, operating_point, "dropped").inc()

    def describe(self) -> dict:
        return {"rate": self.rate, "waiting": self.batcher.spare_waiting, **self.counts}


def _full_path_input(item: PipelineInput, full_expert: str) -> PipelineInput:
    """The request's own preprocessed input, forced onto the full path (its router runs as it did)."""
    return PipelineInput(
        token_ids=item.token_ids,
        image=item.image,
        route=full_expert,
        operating_point=item.operating_point,
        text=item.text,
        spec_image=item.spec_image,
    )


@dataclass
class _AuditJob:
    """A spare job of the micro-batcher: the full path on one request, compared with the pick's answer."""

    auditor: Auditor
    item: PipelineInput
    pick: str
    answer: PipelineOutput
    items: list[PipelineInput] = field(init=False)

    def __post_init__(self) -> None:
        self.items = [self.item]

    def finished(self, outputs: list[PipelineOutput]) -> None:
        [full] = outputs
        self.auditor.metrics.audit_madds.labels(self.auditor.metrics.model).inc(full.madds)
        self.auditor.record(self.pick, self.answer.operating_point, full.label == self.answer.label)

    def failed(self, error: BaseException) -> None:
        logger.warning("an audit of a %s answer could not run (%r): counted as dropped", self.pick, error)
        self.dropped()

    def dropped(self) -> None:
        self.auditor.dropped(self.pick, self.answer.operating_point)
