"""Each answer's ``importance`` and ``explain``'s exact Shapley values through the dynamic pipeline, on the scripted
model of tests/unit/test_pipeline_decisions.py given attribution in its model.json, so the served attribution path
(export/attribution.py, export/execution.py's reruns, export/pipeline.py's bookkeeping) runs without a trained model.

The scripted model's experts: text and image read one modality (``one_modality``); the full path (trunk ->
full_head) reads both, attributed either by rerunning full_head without each modality (``exact``) or by a distilled
head (``head``: the component attribution_full). full_head is linear with the weights below; a request of case c
carries text_features (c, 0) and image_mid (c, 0). model.json's ``absent`` makes a removed text text_features
(0, 1) and a removed image image_mid (0, 0). So the full path's logits for case c are, by hand:

    both        c W_TEXT[0] + c W_IMAGE[0]  = (3c, 0, 0)
    text only   c W_TEXT[0]                 = (c, 0, 0)       (the image removed)
    image only  W_TEXT[1] + c W_IMAGE[0]    = (2c, 0, 3)      (the text removed)

and the distilled head (which reads text_tokens and image_mid) answers (2c, 0, 0) with the image removed and (0, c, 0)
with the text removed. full_head declares image_mid's per-sample size dynamic (-1), as an ONNX export may. v(neither)
is each expert's NEITHER below. Every expected value is worked out from these with the two-player Shapley formula
phi_text = 1/2 [(v_t - v_n) + (v_b - v_i)], phi_image = 1/2 [(v_i - v_n) + (v_b - v_t)] in plain Python.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_pipeline_decisions import MADDS, PROBS, SHARED, WEIGHTS, ScriptedBackend, predict, request, scripted_model

from export import execution
from export.attribution import EXACT, HEAD, WANT_EXACT, WANT_HEAD, Answer, Attributor
from export.pipeline import DynamicPipeline, RouteError
from export.store import ComponentInfo, StoreError, TensorInfo

LABELS = ("cat", "dog", "owl")
W_TEXT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # full_head's weights on text_features (2 -> 3 classes)
W_IMAGE = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # ... on image_mid
NEITHER = {"text": (0.2, 0.6, 0.2), "image": (0.3, 0.3, 0.4), "full": (0.2, 0.5, 0.3)}  # v(neither), as probabilities
HEAD_MADDS, EXACT_MADDS = 7, 6000  # per request: the distilled head; full_head run twice


def full_logits(c: float) -> dict[str, tuple[float, float, float]]:
    """The full path's logits for case c, with both modalities and without each (the table above)."""
    return {"both": (3 * c, 0, 0), "text_only": (c, 0, 0), "image_only": (2 * c, 0, 3)}


def head_logits(c: float) -> dict[str, tuple[float, float, float]]:
    return {"text_only": (2 * c, 0, 0), "image_only": (0, c, 0)}


def probability(logits, k: int) -> float:
    return math.exp(logits[k]) / sum(math.exp(x) for x in logits)


def shapley(v_both: float, v_text: float, v_image: float, v_neither: float) -> tuple[float, float]:
    return 0.5 * ((v_text - v_neither) + (v_both - v_image)), 0.5 * ((v_image - v_neither) + (v_both - v_text))


def share(phi: tuple[float, float]) -> tuple[float, float]:
    """Importance: each modality's share of what raised the answer; by size when neither raised it."""
    positive = [max(p, 0.0) for p in phi]
    if sum(positive) > 0:
        return positive[0] / sum(positive), positive[1] / sum(positive)
    return abs(phi[0]) / (abs(phi[0]) + abs(phi[1])), abs(phi[1]) / (abs(phi[0]) + abs(phi[1]))


def full_values(c: float, label: int, pairs=full_logits) -> tuple[float, float, float, float]:
    """v(S) of the full path for case c and a label: log p(label) under each coalition."""
    both, single = full_logits(c)["both"], pairs(c)
    return (
        math.log(probability(both, label)),
        math.log(probability(single["text_only"], label)),
        math.log(probability(single["image_only"], label)),
        math.log(NEITHER["full"][label]),
    )


class FusionBackend(ScriptedBackend):
    """The scripted backend with full_head linear (W_TEXT, W_IMAGE) and the distilled head attribution_full. Like
    ONNX Runtime, a component refuses inputs of another dtype or per-sample shape than model.json declares."""

    def __init__(self, model):
        super().__init__()
        self.inputs: list[tuple[str, dict[str, np.ndarray]]] = []  # full_head's and attribution_full's inputs
        self.declared = model.components

    def load(self, component: ComponentInfo):
        run = super().load(component)

        def checked(inputs):
            for tensor in self.declared[component.name].inputs:
                value = inputs[tensor.name]
                assert value.dtype == np.dtype(tensor.dtype), (component.name, tensor.name, value.dtype)
                assert len(value.shape) == len(tensor.shape), (component.name, tensor.name, value.shape)
                for size, declared in zip(value.shape[1:], tensor.shape[1:], strict=True):
                    assert declared in (-1, size), (component.name, tensor.name, value.shape)
            if component.name in ("full_head", "attribution_full"):
                self.inputs.append((component.name, {k: v.copy() for k, v in inputs.items()}))
            return run(inputs)

        return checked

    @staticmethod
    def outputs(name, cases, inputs):
        if name == "full_head":
            logits = inputs["text_features"] @ W_TEXT + inputs["image_mid"] @ W_IMAGE
            return {"logits": logits.astype(np.float32)}
        if name == "attribution_full":
            c = inputs["image_mid"][:, 0].astype(np.float64)
            text_only = np.stack([2 * c, 0 * c, 0 * c], axis=1)
            image_only = np.stack([0 * c, c, 0 * c], axis=1)
            return {"coalition_logits": np.stack([text_only, image_only], axis=1).astype(np.float32)}
        return ScriptedBackend.outputs(name, cases, inputs)


def one_modality_entry(modality: str) -> dict:
    return {"method": "one_modality", "modalities": [modality], "neither": np.log(NEITHER[modality]).tolist(),
            "madds": 0, "explain_madds": 0}  # fmt: skip


def full_entry(method: str) -> dict:
    entry = {
        "method": method,
        "modalities": ["image", "text"],  # any order: read as (text, image)
        "components": ["full_head"],
        "absent": {"text": {"text_features": [0.0, 1.0]}, "image": {"image_mid": 0}},
        "neither": np.log(NEITHER["full"]).tolist(),
        "madds": HEAD_MADDS if method == "head" else EXACT_MADDS,
        "explain_madds": EXACT_MADDS,
    }
    return entry | ({"head": "attribution_full"} if method == "head" else {})


def attributed_model(method: str = "exact", **entries):
    experts = {"text": one_modality_entry("text"), "image": one_modality_entry("image"), "full": full_entry(method)}
    experts.update(entries)
    model = scripted_model()
    head = ComponentInfo(
        "attribution_full",
        (TensorInfo("text_tokens", "float32", (-1, 4, 2)), TensorInfo("image_mid", "float32", (-1, 2))),
        (TensorInfo("coalition_logits", "float32", (-1, 2, 3)),),
        HEAD_MADDS,
        {},
    )
    full_head = dataclasses.replace(
        model.components["full_head"],
        inputs=(TensorInfo("image_mid", "float32", (-1, -1)), TensorInfo("text_features", "float32", (-1, 2))),
    )
    manifest = {"attribution": {"experts": {k: v for k, v in experts.items() if v is not None}}}
    components = model.components | {head.name: head, "full_head": full_head}
    return dataclasses.replace(model, manifest=manifest, components=components)


def served(method: str = "exact", **entries):
    model = attributed_model(method, **entries)
    backend = FusionBackend(model)
    return DynamicPipeline(model, backend), backend


def test_an_exact_experts_importance_is_the_shapley_share_of_its_head_rerun_without_each_modality():
    pipeline, backend = served("exact")
    outputs, _, calls = predict(pipeline, backend, request(1, route="full"), request(3))

    for output, c in zip(outputs, (1, 3), strict=True):
        assert (output.expert, output.label, output.importance_method) == ("full", "cat", "exact")
        assert output.probabilities == pytest.approx([probability(full_logits(c)["both"], k) for k in range(3)])
        assert output.importance.tolist() == pytest.approx(share(shapley(*full_values(c, 0))), abs=1e-5)
        assert output.explanation is None
        assert output.attribution_madds == EXACT_MADDS
        assert output.madds == SHARED + MADDS["trunk"] + MADDS["full_head"] + EXACT_MADDS
    # full_head once for the answers, then once on both requests twice over: the image removed (image_mid 0: case
    # 0), then the text removed (image_mid kept, text_features the absent value (0, 1)).
    assert [cases for name, cases in calls if name == "full_head"] == [[1, 3], [0, 0, 1, 3]]
    rerun = backend.inputs[-1][1]
    assert rerun["text_features"].tolist() == [[1, 0], [3, 0], [0, 1], [0, 1]]
    assert rerun["image_mid"].tolist() == [[0, 0], [0, 0], [1, 0], [3, 0]]


def test_explain_gives_the_exact_values_their_shares_the_four_log_probabilities_and_each_coalitions_label():
    pipeline, backend = served("exact")
    outputs, _, _ = predict(pipeline, backend, request(1, route="full", explain=True))

    v_both, v_text, v_image, v_neither = full_values(1, 0)
    phi = shapley(v_both, v_text, v_image, v_neither)
    explanation = outputs[0].explanation
    assert explanation["shapley"] == pytest.approx({"text": phi[0], "image": phi[1]}, abs=1e-5)
    assert explanation["importance"] == pytest.approx(dict(zip(("text", "image"), share(phi), strict=True)), abs=1e-5)
    assert explanation["log_prob"] == pytest.approx(
        {"both": v_both, "text_only": v_text, "image_only": v_image, "neither": v_neither}, abs=1e-5
    )
    # text only (1, 0, 0): cat; image only (2, 0, 3): owl; neither (0.2, 0.5, 0.3): dog.
    assert explanation["labels"] == {"text_only": "cat", "image_only": "owl", "neither": "dog"}
    assert outputs[0].importance.tolist() == pytest.approx(share(phi), abs=1e-5)
    assert outputs[0].attribution_madds == EXACT_MADDS  # the default estimate is already exact: nothing more
    figures = [v for part in ("shapley", "importance", "log_prob") for v in explanation[part].values()]
    assert all(round(v, 6) == v for v in figures)  # to 6 decimals, as documented
    assert any(round(v, 5) != v for v in figures)


def test_a_head_expert_answers_by_its_distilled_head_and_reruns_the_fusion_head_only_when_asked_to_explain():
    pipeline, backend = served("head")
    outputs, _, calls = predict(pipeline, backend, *(request(c, route="full", explain=c == 2) for c in (1, 2, 3)))

    for output, c in zip(outputs, (1, 2, 3), strict=True):
        assert (output.importance_method, output.label) == ("head", "cat")
        expected = share(shapley(*full_values(c, 0, pairs=head_logits)))
        assert output.importance.tolist() == pytest.approx(expected, abs=1e-5)
    assert [o.attribution_madds for o in outputs] == [HEAD_MADDS, HEAD_MADDS + EXACT_MADDS, HEAD_MADDS]
    assert [o.madds - o.attribution_madds for o in outputs] == [SHARED + 4000] * 3
    # The explanation is exact, not the head's estimate.
    phi = shapley(*full_values(2, 0))
    assert outputs[1].explanation["shapley"] == pytest.approx({"text": phi[0], "image": phi[1]}, abs=1e-5)
    assert [o.explanation is None for o in outputs] == [True, False, True]
    assert [cases for name, cases in calls if name == "attribution_full"] == [[1, 2, 3]]
    assert [cases for name, cases in calls if name == "full_head"] == [[1, 2, 3], [0, 2]]


def test_a_one_modality_answer_gives_all_importance_to_its_modality_and_explains_against_its_v_neither():
    pipeline, backend = served("exact")
    outputs, _, calls = predict(pipeline, backend, request(1, explain=True), request(2, explain=True))

    text, image = outputs
    assert (text.expert, text.label, image.expert, image.label) == ("text", "cat", "image", "dog")
    assert [text.importance.tolist(), image.importance.tolist()] == [[1.0, 0.0], [0.0, 1.0]]
    assert (text.importance_method, image.importance_method) == ("one_modality", "one_modality")
    assert (text.attribution_madds, image.attribution_madds) == (0, 0)
    # The text expert answers (0.8, 0.1, 0.1) with its text and v(neither) (0.2, 0.6, 0.2) without it.
    assert text.explanation["log_prob"] == pytest.approx(
        {"both": math.log(0.8), "text_only": math.log(0.8), "image_only": math.log(0.2), "neither": math.log(0.2)},
        abs=1e-5,
    )
    assert text.explanation["shapley"] == pytest.approx({"text": math.log(4), "image": 0.0}, abs=1e-5)
    assert text.explanation["labels"] == {"text_only": "cat", "image_only": "dog", "neither": "dog"}
    # The image expert: (0.2, 0.7, 0.1) with its image, (0.3, 0.3, 0.4) without.
    assert image.explanation["shapley"] == pytest.approx({"text": 0.0, "image": math.log(0.7 / 0.3)}, abs=1e-5)
    assert image.explanation["importance"] == pytest.approx({"text": 0.0, "image": 1.0}, abs=1e-6)
    assert image.explanation["labels"] == {"text_only": "owl", "image_only": "dog", "neither": "owl"}
    assert [name for name, _ in calls if name in ("full_head", "attribution_full")] == []  # nothing reran


def test_soft_fusion_weighs_each_experts_importance_by_its_part_in_the_answers_probability():
    pipeline, backend = served("exact")
    outputs, _, _ = predict(pipeline, backend, request(1, route="soft", explain=True))

    answer = outputs[0]
    weights = WEIGHTS[1]  # text, image, full
    full_probs = [probability(full_logits(1)["both"], k) for k in range(3)]
    experts_probs = [PROBS["text"][1], PROBS["image"][1], full_probs]
    mixed = [sum(w * p[k] for w, p in zip(weights, experts_probs, strict=True)) for k in range(3)]
    assert answer.probabilities == pytest.approx(mixed, abs=1e-6)
    assert (answer.label, answer.importance_method) == ("cat", "mixture")
    parts = [w * p[0] for w, p in zip(weights, experts_probs, strict=True)]  # w_e p_e(cat)
    full_share = share(shapley(*full_values(1, 0)))
    expected = (
        (parts[0] * 1.0 + parts[1] * 0.0 + parts[2] * full_share[0]) / sum(parts),
        (parts[0] * 0.0 + parts[1] * 1.0 + parts[2] * full_share[1]) / sum(parts),
    )
    assert answer.importance.tolist() == pytest.approx(expected, abs=1e-5)
    assert answer.importance.dtype == np.float32
    assert answer.attribution_madds == EXACT_MADDS
    # The explanation is of the mixture as served: each coalition's probabilities mixed with the same weights.
    text_only = [weights[0] * PROBS["text"][1][k] + weights[1] * NEITHER["image"][k]
                 + weights[2] * probability(full_logits(1)["text_only"], k) for k in range(3)]  # fmt: skip
    image_only = [weights[0] * NEITHER["text"][k] + weights[1] * PROBS["image"][1][k]
                  + weights[2] * probability(full_logits(1)["image_only"], k) for k in range(3)]  # fmt: skip
    neither = [sum(w * NEITHER[e][k] for w, e in zip(weights, ("text", "image", "full"), strict=True))
               for k in range(3)]  # fmt: skip
    values = [math.log(p[0]) for p in (mixed, text_only, image_only, neither)]
    assert answer.explanation["log_prob"] == pytest.approx(
        dict(zip(("both", "text_only", "image_only", "neither"), values, strict=True)), abs=1e-5
    )
    phi = shapley(*values)
    assert answer.explanation["shapley"] == pytest.approx({"text": phi[0], "image": phi[1]}, abs=1e-5)
    labels = {name: LABELS[int(np.argmax(p))] for name, p in
              (("text_only", text_only), ("image_only", image_only), ("neither", neither))}  # fmt: skip
    assert answer.explanation["labels"] == labels


def test_soft_fusion_with_one_eligible_expert_is_that_experts_importance():
    pipeline, backend = served("exact")
    outputs, _, _ = predict(pipeline, backend, request(2, route="soft", text=False, explain=True))

    assert outputs[0].importance.tolist() == [0.0, 1.0]
    assert outputs[0].importance_method == "one_modality"
    # The image expert's own exact values: (0.2, 0.7, 0.1) with its image, (0.3, 0.3, 0.4) without.
    assert outputs[0].explanation["shapley"] == pytest.approx({"text": 0.0, "image": math.log(0.7 / 0.3)}, abs=1e-5)


@pytest.mark.parametrize("method", ["exact", "head"])
def test_a_confidence_fallback_is_attributed_as_the_full_path_that_answered(method):
    # Case 4 routes to text, whose top probability 0.5 is under the floor: the full path answers (case 4: (12, 0, 0)).
    pipeline, backend = served(method)
    outputs, _, calls = predict(pipeline, backend, request(4, min_confidence=0.6, explain=True), request(1))

    fell_back, text = outputs
    assert (fell_back.expert, fell_back.fallback_from, fell_back.importance_method) == ("full", "text", method)
    pairs = head_logits if method == "head" else full_logits
    assert fell_back.importance.tolist() == pytest.approx(share(shapley(*full_values(4, 0, pairs))), abs=1e-5)
    phi = shapley(*full_values(4, 0))
    assert fell_back.explanation["shapley"] == pytest.approx({"text": phi[0], "image": phi[1]}, abs=1e-5)
    assert fell_back.attribution_madds == EXACT_MADDS + (HEAD_MADDS if method == "head" else 0)
    assert (text.importance.tolist(), text.attribution_madds) == ([1.0, 0.0], 0)
    assert [cases for name, cases in calls if name == "full_head"] == [[4], [0, 4]]


def test_the_attribution_reruns_count_in_the_answering_experts_time(monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(execution.time, "perf_counter", lambda: float(next(ticks)))  # every timed step: 1 s
    pipeline, backend = served("exact")

    _, seconds, _ = predict(pipeline, backend, request(1, route="full"), request(1))

    # trunk, full_head, text_head: 1 s each; then the full path's rerun for attribution, 1 s.
    assert seconds == pytest.approx({"full": 3.0, "text": 1.0})


def test_a_model_exported_before_attribution_reports_the_routers_modality_weights_and_refuses_explain():
    model = dataclasses.replace(scripted_model(), manifest={})
    backend = FusionBackend(attributed_model())
    pipeline = DynamicPipeline(model, backend)
    outputs, _, calls = predict(pipeline, backend, request(3), request(1), request(3, route="soft"))

    full, text, soft = outputs
    # The scripted router's modality weights: each present modality's share, (0.5, 0.5) with both.
    assert (full.importance.tolist(), full.importance_method) == ([0.5, 0.5], "unavailable")
    assert full.importance.dtype == np.float32
    assert (soft.importance.tolist(), soft.importance_method) == ([0.5, 0.5], "unavailable")
    assert (text.importance.tolist(), text.importance_method) == ([1.0, 0.0], "one_modality")
    assert [o.attribution_madds for o in outputs] == [0, 0, 0]
    assert [name for name, _ in calls].count("full_head") == 1  # nothing reran
    with pytest.raises(RouteError, match=r"exported before attribution existed \(text, image, full cannot be expl"):
        pipeline.predict([request(3, explain=True)])
    with pytest.raises(RouteError, match=r"\(text cannot be explained\); export it again"):
        pipeline.predict([request(1, route="text", explain=True)])
    pipeline.check_explain("auto", explain=False)  # not asked: nothing to refuse


def test_explain_is_refused_only_for_the_experts_that_cannot_give_it():
    pipeline, _ = served("exact", image=None)  # the image expert's entry missing: no v(neither) for it
    pipeline.check_explain("text", explain=True)
    pipeline.check_explain("full", explain=True)
    with pytest.raises(RouteError, match=r"\(image cannot be explained\)"):
        pipeline.check_explain("soft", explain=True)
    with pytest.raises(RouteError, match=r"\(image cannot be explained\)"):
        pipeline.check_explain("image", explain=True)


def test_what_each_expert_asks_of_its_side_and_how_a_mixture_is_named():
    exact, head = Attributor(attributed_model("exact")), Attributor(attributed_model("head"))
    assert {WANT_HEAD, WANT_EXACT} == {1, 2}  # bit flags: both fit in one row's flags
    assert [exact.wants("text", False), exact.wants("text", True)] == [0, 0]  # one modality: nothing to run
    assert [exact.wants("full", False), exact.wants("full", True)] == [WANT_EXACT, WANT_EXACT]
    assert [head.wants("full", False), head.wants("full", True)] == [WANT_HEAD, WANT_HEAD | WANT_EXACT]
    assert exact.default_method(["text", "image"]) == "one_modality"
    assert exact.default_method(["full"]) == "exact"
    assert exact.default_method(["text", "full"]) == "mixture"
    unavailable = Attributor(attributed_model("exact", full=None))
    assert unavailable.experts["full"].method == "unavailable"
    assert unavailable.default_method(["text", "full"]) == "unavailable"
    assert unavailable.default_method(["full", "text"]) == "unavailable"
    assert [unavailable.can_explain(e) for e in ("text", "image", "full")] == [True, True, False]
    assert unavailable.wants("full", False) == 0  # nothing it can compute (explain is refused before: check_explain)
    assert [unavailable.experts[e].expert for e in ("text", "image", "full")] == ["text", "image", "full"]
    # Its answers report the router's modality weights, as float32 whatever they came as.
    answer = Answer(0, ["full"], np.ones(1), [np.array([0.5, 0.3, 0.2])], [{HEAD: None, EXACT: None}])
    reported = unavailable.attribute(answer, explain=False, fallback_weights=np.array([0.25, 0.75]))
    assert (reported.importance.tolist(), reported.importance.dtype, reported.method) == (
        [0.25, 0.75], np.float32, "unavailable"
    )  # fmt: skip


def test_a_mixture_of_two_experts_weighs_each_by_its_part_in_the_label_and_shares_equally_when_neither_has_it():
    attributor = Attributor(attributed_model())
    text, image = np.array([0.8, 0.1, 0.1]), np.array([0.4, 0.5, 0.1])
    answer = Answer(0, ["text", "image"], np.array([0.5, 0.5]), [text, image], [{}, {}])
    # w p(cat): 0.5 * 0.8 for the text expert (importance (1, 0)), 0.5 * 0.4 for the image expert ((0, 1)).
    assert attributor.attribute(answer, explain=False).importance.tolist() == pytest.approx([2 / 3, 1 / 3])
    never = Answer(2, ["text", "image"], np.array([0.7, 0.3]), [np.array([1.0, 0, 0]), np.array([0, 1.0, 0])], [{}, {}])
    assert attributor.attribute(never, explain=False).importance.tolist() == [0.5, 0.5]


def test_an_expert_side_that_did_not_answer_leaves_an_even_importance_and_an_undefined_explanation_not_an_error():
    # On Ray an expert deployment that failed sends no coalition logits; its requests get its error instead.
    attributor = Attributor(attributed_model("exact"))
    probabilities = np.array([probability(full_logits(1)["both"], k) for k in range(3)])
    answer = Answer(0, ["full"], np.ones(1), [probabilities], [{HEAD: None, EXACT: None}])
    attributed = attributor.attribute(answer, explain=True)

    assert attributed.importance.tolist() == [0.5, 0.5]  # nothing known of either modality's part
    assert math.isnan(attributed.explanation["shapley"]["text"])
    log_prob = attributed.explanation["log_prob"]
    assert log_prob["both"] == pytest.approx(math.log(probabilities[0]), abs=1e-6)
    assert log_prob["neither"] == pytest.approx(math.log(0.2), abs=1e-6)
    assert math.isnan(log_prob["text_only"]) and math.isnan(log_prob["image_only"])  # noqa: PT018


def test_a_coalition_whose_probability_underflows_counts_as_log_1e_30_not_minus_infinity():
    attributor = Attributor(attributed_model("exact"))
    probabilities = np.array([probability(full_logits(1)["both"], k) for k in range(3)])
    pair = np.array([[0.0, 2000.0, 0.0], [1.0, 0.0, 0.0]])  # without the image, cat's probability is exactly 0
    answer = Answer(0, ["full"], np.ones(1), [probabilities], [{HEAD: None, EXACT: pair}])
    explanation = attributor.attribute(answer, explain=True).explanation

    assert explanation["log_prob"]["text_only"] == round(math.log(1e-30), 6)
    assert math.isfinite(explanation["shapley"]["text"]) and math.isfinite(explanation["shapley"]["image"])  # noqa: PT018


def test_model_json_attribution_is_read_in_modality_order_with_its_costs():
    info = Attributor(attributed_model("head")).experts["full"]
    assert (info.method, info.modalities, info.components, info.head) == (
        "head", ("text", "image"), ("full_head",), "attribution_full"
    )  # fmt: skip
    assert (info.madds, info.explain_madds) == (HEAD_MADDS, EXACT_MADDS)
    assert info.neither.tolist() == pytest.approx(np.log(NEITHER["full"]).tolist())
    assert info.absent == {"text": {"text_features": [0.0, 1.0]}, "image": {"image_mid": 0}}
    text = Attributor(attributed_model("exact")).experts["text"]
    assert (text.modalities, text.components, text.head, text.absent) == (("text",), (), None, {})


def broken(**changes) -> dict:
    entry = full_entry("head")
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    return entry


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (broken(method="magic"), r"method 'magic' is not one of \('one_modality', 'exact', 'head'\)$"),
        (broken(neither=[0.0, 0.0]), r"full: neither needs 3 log-probabilities$"),
        (broken(neither=None), r"full: neither needs 3 log-probabilities$"),
        (broken(components=["fusion"]), r"full: components \['fusion'\] not in the model$"),
        (broken(components=None), r"full: components none not in the model$"),
        (broken(head="attribution_gone"), r"full: components \['attribution_gone'\] not in the model$"),
        (broken(absent={"text": {"text_features": 0}}), r"full: absent needs the representation of each modality$"),
        (broken(absent=None), r"full: absent needs the representation of each modality$"),
        (broken(head=None), r"full: method head names no head$"),
        (broken(method="magic", neither=None), r"full: method 'magic' is not one of .*; neither needs 3 log-pr"),
        (broken(madds=None), r"attribution of expert full is malformed: 'madds'"),
        (broken(explain_madds=None), r"attribution of expert full is malformed: 'explain_madds'"),
        (broken(method=None), r"attribution of expert full is malformed: 'method'"),
        (broken(madds="lots"), r"attribution of expert full is malformed: invalid literal"),
        (broken(neither="flat"), r"attribution of expert full is malformed: could not convert"),
    ],
)
def test_a_malformed_attribution_in_model_json_is_refused_naming_the_expert_and_the_problem(entry, problem):
    with pytest.raises(StoreError, match=problem) as refused:
        Attributor(attributed_model(full=entry))
    assert str(refused.value).startswith(".: attribution of expert full")  # the model's path, then the expert


def test_a_one_modality_expert_needs_no_components_nor_absent_values_but_does_need_its_v_neither():
    Attributor(attributed_model(text={"method": "one_modality", "modalities": ["text"],
                                      "neither": [0.0, 0.0, 0.0], "madds": 0, "explain_madds": 0}))  # fmt: skip
    with pytest.raises(StoreError, match=r"expert text: neither needs 3 log-probabilities$"):
        Attributor(attributed_model(text=one_modality_entry("text") | {"neither": [0.0]}))
