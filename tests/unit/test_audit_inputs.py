"""service/audit.py feeds the guard's inputs test: every request the guard's point's router decided (audited or not,
cheaper or full) sends its out-of-distribution p-value; forced routes, one modality and other points do not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.pipeline import PipelineInput, PipelineOutput
from service.audit import Auditor
from service.guard import Guard, GuardSettings
from service.metrics import Metrics

POINT = "lambda_0.6"
SAFETY = {
    "operating_points": {POINT: {"agreement": 0.95}},
    "guard": {POINT: {"operating_point": POINT, "min_confidence": 0.5, "policy": f"{POINT}+min_confidence=0.5"}},
}


class Recorder(Guard):
    def __init__(self):
        settings = GuardSettings(
            enabled=True, margin=0.05, recover_margin=0.02, window=20, min_audits=10, false_alarm_audits=1000,
            shifted_false_alarm_audits=100, input_shift_share=0.05, input_false_alarm_requests=100, ood_alpha=0.01,
        )  # fmt: skip
        super().__init__(model="m", operating_point=POINT, min_confidence=None, safety=SAFETY, settings=settings)
        self.pvalues = []

    def observe_input(self, ood_pvalue: float) -> None:
        self.pvalues.append(ood_pvalue)
        super().observe_input(ood_pvalue)


def item(route="auto", text=True, image=True) -> PipelineInput:
    return PipelineInput(
        token_ids=np.zeros(4, dtype=np.int64) if text else None,
        image=np.zeros((2, 2, 3), dtype=np.uint8) if image else None,
        route=route,
    )


def output(pvalue: float, expert="text", decided_by="router", point=POINT, fallback_label=None) -> PipelineOutput:
    return PipelineOutput(
        label="a", probabilities=np.ones(2) / 2, expert=expert, decided_by=decided_by, route_scores=np.zeros(2),
        modality_weights=np.zeros(2), importance=np.zeros(2), madds=1, operating_point=point,
        fallback_label=fallback_label, ood_pvalue=pvalue,
    )  # fmt: skip


class NoSpare:
    def offer_spare(self, job) -> None:
        raise AssertionError("no audit job expected: rate 0 draws none")


def test_every_routed_request_of_the_guards_point_sends_its_p_value_and_no_other():
    guard = Recorder()
    auditor = Auditor(full_expert="full", batcher=NoSpare(), metrics=Metrics("m"), guard=guard, rate=1e-12)
    items = [item(), item(), item(route="text"), item(text=False), item(), item(), item()]
    outputs = [
        output(0.001),  # a cheaper pick, out of distribution
        output(0.3, expert="full"),  # the router picked the full path: its input counts too
        output(0.002, decided_by="request"),  # forced
        output(0.003, decided_by="missing_modality"),
        output(0.004, point="lambda_0"),  # another point's router
        output(0.005, decided_by="threshold"),  # escalated by a threshold: not the router's pick alone
        output(0.5, decided_by="confidence", fallback_label="a"),  # the router's pick, then a fallback
    ]
    auditor.rng.random = lambda: 0.5  # never under the rate: no audit
    auditor.after_response(items, outputs)
    assert guard.pvalues == [0.001, 0.3, 0.5]
    assert guard.inputs.observations == 3
    # one flagged input (log 5), then two typical ones (log(0.95 / 0.99) each)
    assert guard.inputs.value == pytest.approx(math.log(5) + 2 * math.log(0.95 / 0.99))


def test_at_rate_0_the_guard_is_off_and_hears_nothing():
    guard = Recorder()
    auditor = Auditor(full_expert="full", batcher=NoSpare(), metrics=Metrics("m"), guard=guard, rate=0.0)
    auditor.after_response([item()], [output(0.001)])
    assert guard.pvalues == []
