"""``Attributor.attribute_all`` (a batch's importance in a few NumPy calls) gives exactly what ``attribute`` gives
answer by answer, on the shipped model's real answers and on made-up ones at the edges (tiny probabilities, huge
logits, a missing coalition, soft fusion, explain); and the figures are the two-player Shapley shares worked out
by hand in plain Python."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.attribution import EXACT, HEAD, ONE_MODALITY, Answer, Attributor
from export.backends import create_backend
from export.pipeline import DynamicPipeline
from export.store import load_model
from models.attribution import TIE


def same(batched, one_by_one) -> None:
    assert len(batched) == len(one_by_one)
    for got, want in zip(batched, one_by_one, strict=True):
        assert got.method == want.method
        assert got.importance.dtype == want.importance.dtype
        np.testing.assert_array_equal(got.importance, want.importance)  # bit for bit, not approximately
        assert got.explanation == want.explanation


def by_hand(probabilities, pair, neither, label: int) -> tuple[float, float]:
    """Text and image shares of the label's log-probability, from the module docstring of models/attribution.py:
    phi_text = ((v(T) - v(0)) + (v(TI) - v(I))) / 2, the positive parts normalized (else the sizes, else 1/2)."""

    def log_softmax_at(logits) -> float:
        top = max(float(v) for v in logits)
        return float(logits[label]) - top - math.log(sum(math.exp(float(v) - top) for v in logits))

    both = math.log(max(float(probabilities[label]), 1e-30))
    text_only, image_only = log_softmax_at(pair[0]), log_softmax_at(pair[1])
    phi = (
        0.5 * ((text_only - neither[label]) + (both - image_only)),
        0.5 * ((image_only - neither[label]) + (both - text_only)),
    )
    positive = [max(v, 0.0) for v in phi]
    if sum(positive) > TIE:
        return positive[0] / sum(positive), positive[1] / sum(positive)
    size = [abs(v) for v in phi]
    return (size[0] / sum(size), size[1] / sum(size)) if sum(size) > TIE else (0.5, 0.5)


@pytest.fixture(scope="module")
def pipeline(tiny_store):
    return DynamicPipeline(load_model(tiny_store), create_backend("onnx", "cpu", 1))


def test_the_shipped_models_answers_are_attributed_as_one_by_one(pipeline, samples):
    seen = []
    attribute_all = pipeline.attributor.attribute_all

    def recording(answers, explain, weights):
        batched = attribute_all(answers, explain, weights)
        reference = [
            pipeline.attributor.attribute(a, bool(e), w) for a, e, w in zip(answers, explain, weights, strict=True)
        ]
        same(batched, reference)
        seen.extend(zip(answers, batched, strict=True))
        return batched

    pipeline.attributor.attribute_all = recording
    inputs = [pipeline.prepare(s["text"], _image(s["png"])) for s in samples[:192]]
    for route in ("auto", "mi2p", "mulmix", "late_fusion", "muse", "text", "soft"):
        for start in range(0, len(inputs), 16):
            batch = [_with(x, route=route, explain=(route == "auto" and k % 5 == 0)) for k, x in
                     enumerate(inputs[start : start + 16])]  # fmt: skip
            pipeline.predict(batch)
    methods = {pipeline.attributor.experts[a.experts[0]].method for a, _ in seen if len(a.experts) == 1}
    assert {ONE_MODALITY, EXACT, HEAD} <= methods, methods
    checked = 0
    for answer, attributed in seen:
        if len(answer.experts) != 1:
            continue
        info = pipeline.attributor.experts[answer.experts[0]]
        if info.method == ONE_MODALITY:
            assert attributed.importance.tolist() == [float(m in info.modalities) for m in ("text", "image")]
            continue
        pair = answer.coalitions[0][info.method]
        want = by_hand(answer.probabilities[0], pair, info.neither, answer.label)
        assert attributed.importance.tolist() == pytest.approx(want, abs=1e-6)
        checked += 1
    assert checked > 100


def test_edge_cases_are_attributed_as_one_by_one(pipeline):
    attributor: Attributor = pipeline.attributor
    rng = np.random.default_rng(3)
    k = len(pipeline.model.labels)
    answers, explain = [], []
    experts = list(attributor.experts)
    for i in range(400):
        expert = experts[i % len(experts)]
        method = attributor.experts[expert].method
        scale = (1e-3, 1.0, 30.0, 300.0)[i % 4]
        probabilities = rng.dirichlet(np.full(k, 0.05 if i % 3 else 5.0)).astype(np.float32)
        if i % 11 == 0:
            probabilities[:] = 0.0  # below 1e-30: the floor
            probabilities[i % k] = 1.0
        pair = (rng.standard_normal((2, k)) * scale).astype(np.float32)
        if i % 13 == 0:
            pair[:] = 0.0  # Shapley values of 0: the tie rule
        coalitions = {EXACT: None, HEAD: None}
        if method in (EXACT, HEAD) and i % 17:
            coalitions[method] = pair  # every 17th is missing (an expert deployment that did not answer)
        label = int(rng.integers(k)) if i % 2 else int(probabilities.argmax())
        answers.append(Answer(label, [expert], np.ones(1), [probabilities], [coalitions]))
        explain.append(False)
    # A soft mixture and an explained answer go the one-by-one way in the batch too.
    mixed = [e for e in experts if attributor.experts[e].method in (EXACT, HEAD)][:2]
    soft_probs = [rng.dirichlet(np.ones(k)).astype(np.float32) for _ in mixed]
    soft_pairs = [{EXACT: rng.standard_normal((2, k)), HEAD: rng.standard_normal((2, k))} for _ in mixed]
    answers.append(Answer(1, mixed, np.array([0.3, 0.7]), soft_probs, soft_pairs))
    explain.append(False)
    weights = rng.random((len(answers), 2)).astype(np.float32)
    explain = np.array(explain)

    batched = attributor.attribute_all(answers, explain, weights)
    same(batched, [attributor.attribute(a, bool(e), w) for a, e, w in zip(answers, explain, weights, strict=True)])
    assert len({a.method for a in batched}) >= 3


def _image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _with(x, **changes):
    import dataclasses

    return dataclasses.replace(x, **changes)


def test_a_blocks_softmax_is_each_rows_own_bit_for_bit():
    """The pipeline takes each answer's probabilities from its expert's softmax over the whole sub-batch, where it
    took them row by row: the same numbers, whatever the block's size and the logits' scale."""
    from export.pipeline import softmax

    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 64):
        for scale in (1e-3, 1.0, 10.0, 80.0):
            block = (rng.standard_normal((n, 12)) * scale).astype(np.float32)
            whole = softmax(block)
            for i in range(n):
                np.testing.assert_array_equal(whole[i], softmax(block[i][None])[0])


def test_each_answers_probabilities_are_its_experts_softmax_row_or_the_soft_mix(pipeline, samples):
    """What ``_combine`` gives each request, worked out row by row from the logits the experts returned: a hard-routed
    request its expert's softmax (bit for bit), a soft one the router-weighted mix of every eligible expert's."""
    from export.pipeline import softmax

    captured = []
    make = pipeline.execution

    def recording_execution(*args):
        execution = make(*args)
        run = execution.run

        def recording_run(members, wants=None):
            logits, seconds = run(members, wants)
            captured.append((dict(members), dict(logits)))
            return logits, seconds

        execution.run = recording_run
        return execution

    pipeline.execution = recording_execution
    try:
        inputs = [pipeline.prepare(s["text"], _image(s["png"])) for s in samples[:96]]
        for route in ("auto", "soft", "mi2p", "text"):
            for start in range(0, len(inputs), 16):
                captured.clear()
                batch = [_with(x, route=route) for x in inputs[start : start + 16]]
                outputs, _ = pipeline.predict(batch)
                members, logits = captured[0]
                rows = {e: {int(r): k for k, r in enumerate(m)} for e, m in members.items()}
                for i, out in enumerate(outputs):
                    if out.fallback_from is not None:
                        continue  # the full path's answer replaced it (test_pipeline_answers covers the fallback)
                    if route == "soft":
                        w = out.weights
                        want = np.zeros(len(pipeline.labels), np.float32)
                        for e, expert in enumerate(pipeline.experts):
                            if w[e] > 0:
                                want += w[e] * softmax(logits[expert][rows[expert][i]][None])[0]
                        np.testing.assert_array_equal(out.probabilities, want)
                    else:
                        row = logits[out.expert][rows[out.expert][i]]
                        np.testing.assert_array_equal(out.probabilities, softmax(row[None])[0])
    finally:
        pipeline.execution = make
