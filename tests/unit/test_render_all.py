"""The v1 bodies of a call's answers, rendered together, hold each figure as ``round(float(value), 6)`` of the answer's
own arrays: the one-by-one rendering they replace, worked out here value by value."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from export.pipeline import PipelineOutput
from service.batcher import BatchResult
from service.inference import InferenceService

LABELS = tuple(f"class_{k}" for k in range(5))
EXPERTS = ("text", "image", "mi2p")
MADDS_FULL = 9_000_000


def service() -> InferenceService:
    """The parts of a service that rendering reads; nothing is loaded."""
    made = object.__new__(InferenceService)
    made.model = SimpleNamespace(name="m", version="3", labels=LABELS, madds_full=MADDS_FULL)
    made.pipeline = SimpleNamespace(experts=EXPERTS)
    made.settings = SimpleNamespace(uncertain_confidence=0.5, uncertain_ood_alpha=0.01)
    return made


def output(rng: np.random.Generator, i: int) -> PipelineOutput:
    # float32 values whose sixth decimal is a near tie, where a rounding that went another way would show
    probabilities = rng.dirichlet(np.ones(len(LABELS))).astype(np.float32)
    probabilities[0] = np.float32(0.1234565)
    return PipelineOutput(
        label=LABELS[int(probabilities.argmax())],
        probabilities=probabilities,
        expert=EXPERTS[i % 3],
        decided_by="router",
        route_scores=rng.random(len(EXPERTS)).astype(np.float32),
        modality_weights=np.array([0.3333335, 0.6666665], np.float32),
        importance=rng.random(2).astype(np.float32),
        madds=int(rng.integers(1, MADDS_FULL)),
        operating_point="lambda_0.6",
        weights=rng.random(len(EXPERTS)).astype(np.float32) if i % 4 == 0 else None,
        fallback_from="text" if i % 5 == 0 else None,
        importance_method="exact",
        attribution_madds=7,
        guarded=i % 2 == 0,
        confidence=float(rng.random()),
        ood_pvalue=(1.0, 0.001)[i % 2],
    )


def test_each_body_holds_the_figures_of_its_own_answer_rounded_as_before():
    rng = np.random.default_rng(11)
    results = [BatchResult(output(rng, i), queue_seconds=0.001 * i, inference_seconds=0.0042) for i in range(13)]
    ids = [f"req-{i}" for i in range(13)]
    started = time.perf_counter()
    bodies = service().render_all(results, ids, started)

    assert [b["id"] for b in bodies] == ids
    for body, result in zip(bodies, results, strict=True):
        out = result.output
        assert body["scores"] == {label: round(float(p), 6) for label, p in zip(LABELS, out.probabilities, strict=True)}
        assert body["route"]["scores"] == {
            e: round(float(s), 6) for e, s in zip(EXPERTS, out.route_scores, strict=True)
        }
        assert body["route"]["modality_weights"] == {
            "text": round(float(out.modality_weights[0]), 6),
            "image": round(float(out.modality_weights[1]), 6),
        }
        assert body["importance"] == {
            "text": round(float(out.importance[0]), 6),
            "image": round(float(out.importance[1]), 6),
        }
        assert ("weights" in body["route"]) == (out.weights is not None)
        assert body["route"].get("fallback_from") == out.fallback_from
        assert body["route"]["guarded"] == out.guarded
        assert body["compute"] == {
            "madds": out.madds,
            "madds_full": MADDS_FULL,
            "saved_ratio": round(1.0 - out.madds / MADDS_FULL, 6),
            "attribution_madds": 7,
        }
        if out.ood_pvalue < 0.01:
            assert (body["uncertain"], body["uncertain_reason"]) == (True, "out_of_distribution")
        elif out.confidence < 0.5:
            assert (body["uncertain"], body["uncertain_reason"]) == (True, "low_confidence")
        else:
            assert body["uncertain"] is False
            assert "uncertain_reason" not in body
        assert body["timing_ms"]["queue"] == round(1000 * result.queue_seconds, 3)


def test_one_result_renders_as_it_does_among_others():
    rng = np.random.default_rng(5)
    results = [BatchResult(output(rng, i), queue_seconds=0.0, inference_seconds=0.0) for i in range(4)]
    together = service().render_all(results, ["a", "b", "c", "d"], time.perf_counter())
    alone = service().render(results[2], "c", time.perf_counter())
    for body in (together[2], alone):
        body.pop("timing_ms")
    assert alone == together[2]
