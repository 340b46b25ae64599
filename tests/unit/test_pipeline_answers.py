"""What each answer of the dynamic pipeline says about itself beyond its route, on the scripted model of
tests/unit/test_pipeline_decisions.py: its calibrated confidence (the answering expert's validation temperature,
worked out by hand), its out-of-distribution p-value (what the density is given, and what comes back), the
request a client's text and picture become (``prepare``), and what ``warmup`` runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from test_pipeline_decisions import PROBS, ScriptedBackend, predict, request, scripted_model

from export.pipeline import DynamicPipeline, PipelineInput, _normalized, softmax


def with_model(backend, **fields) -> DynamicPipeline:
    return DynamicPipeline(dataclasses.replace(scripted_model(), **fields), backend)


def tempered_top(probabilities, temperature: float) -> float:
    """max softmax(log p / T), by hand: p^(1/T) normalized."""
    powered = np.asarray(probabilities, np.float64) ** (1 / temperature)
    return float(powered.max() / powered.sum())


def test_each_answers_confidence_is_its_experts_top_probability_at_that_experts_temperature():
    backend = ScriptedBackend()
    pipeline = with_model(backend, safety={"expert_temperatures": {"text": 2.0, "image": 0.5}})
    # Case 1 -> text, case 2 -> image, case 3 -> full (no temperature: as it is), a soft mix (as it is), and case
    # 4 with a confidence floor that hands text's unsure answer to the full path (full answers: as it is).
    outputs, _, _ = predict(
        pipeline, backend, request(1), request(2), request(3), request(1, route="soft"), request(4, min_confidence=0.9)
    )

    text, image, full, soft, fell_back = outputs
    assert (text.expert, image.expert, full.expert, fell_back.expert) == ("text", "image", "full", "full")
    assert text.confidence == pytest.approx(tempered_top(PROBS["text"][1], 2.0), abs=1e-6)
    assert image.confidence == pytest.approx(tempered_top(PROBS["image"][2], 0.5), abs=1e-6)
    assert full.confidence == pytest.approx(0.7, abs=1e-6)
    assert soft.confidence == pytest.approx(float(soft.probabilities.max()), abs=1e-6)
    assert fell_back.confidence == pytest.approx(0.4, abs=1e-6)  # full's own answer to case 4: (0.3, 0.4, 0.3)


def test_without_temperatures_confidence_is_the_top_probability():
    backend = ScriptedBackend()
    outputs, _, _ = predict(with_model(backend), backend, request(1), request(2))

    assert [o.confidence for o in outputs] == pytest.approx([0.8, 0.7], abs=1e-6)


class RecordingDensity:
    """Stands in for models/ood.py's OodDetector: records what it is given, answers 0.1, 0.2, ... by row."""

    def __init__(self):
        self.seen: dict = {}

    def pvalues(self, text_features, glimpse_features, has_text, has_image, image_map=None, map_rows=None):
        self.seen = {
            "text": text_features[:, 0].tolist(),
            "glimpse": glimpse_features[:, 0].tolist(),
            "has_text": has_text.tolist(),
            "has_image": has_image.tolist(),
            "map": None if image_map is None else image_map[:, 0].tolist(),
            "map_rows": None if map_rows is None else map_rows.tolist(),
        }
        return (np.arange(len(has_text)) + 1) / 10


class MapBackend(ScriptedBackend):
    """The scripted backend whose image trunk also gives its feature map (models/ood.py MAP_TENSOR)."""

    @staticmethod
    def outputs(name, cases, inputs):
        out = ScriptedBackend.outputs(name, cases, inputs)
        if name == "trunk":
            out["image_map"] = np.stack([cases * 10.0, np.zeros(len(cases))], axis=1).astype(np.float32)
        return out


@pytest.mark.parametrize("backend_class", [ScriptedBackend, MapBackend], ids=["no map", "with the map"])
def test_each_answers_ood_pvalue_is_the_densitys_on_the_features_it_carries(backend_class):
    backend = backend_class()
    density = RecordingDensity()
    pipeline = with_model(backend, ood=density)
    # Case 1 -> text (no trunk), case 2 -> image (the trunk runs), text alone (case 3), an image alone (case 4).
    outputs, _, _ = predict(pipeline, backend, request(1), request(2), request(3, image=False), request(4, text=False))

    assert [o.ood_pvalue for o in outputs] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    seen = density.seen
    assert seen["text"] == [1, 2, 3, 0]  # zeros where a modality is missing
    assert seen["glimpse"] == [1, 2, 0, 4]
    assert seen["has_text"] == [True, True, True, False]
    assert seen["has_image"] == [True, True, False, True]
    if backend_class is MapBackend:  # the rows whose path ran the image trunk here: case 2 (image), case 4
        trunk_rows = [i for i, o in enumerate(outputs) if o.expert in ("image", "full")]
        assert seen["map_rows"] == trunk_rows
        assert seen["map"] == [10.0 * (i + 1) for i in trunk_rows]
    else:
        assert seen["map"] is None and seen["map_rows"] is None  # noqa: PT018


def test_without_a_density_every_pvalue_is_one():
    backend = ScriptedBackend()
    outputs, _, _ = predict(with_model(backend), backend, request(1), request(2, text=False))

    assert [o.ood_pvalue for o in outputs] == [1.0, 1.0]


def test_prepare_turns_text_and_a_picture_into_the_models_input():
    pipeline = with_model(ScriptedBackend())
    picture = Image.new("RGB", (8, 8), (10, 20, 30))

    both = pipeline.prepare("a b zebra", picture, route="text", threshold=0.3)
    text_only = pipeline.prepare("d", None)
    image_only = pipeline.prepare(None, picture)

    # The scripted vocabulary: <pad> 0, <unk> 1, a 2, b 3, c 4, d 5; four tokens, padded.
    assert both.token_ids.tolist() == [2, 3, 1, 0] and both.token_ids.dtype == np.int64  # noqa: PT018
    assert both.image.shape == (4, 4, 3) and both.image.dtype == np.uint8  # noqa: PT018
    assert (both.image == np.array([10, 20, 30], np.uint8)).all()
    assert (both.route, both.threshold) == ("text", 0.3)
    assert both.text is None and both.spec_image is None  # noqa: PT018 - no expert brings its own preprocessing
    assert text_only.token_ids.tolist() == [5, 0, 0, 0] and text_only.image is None  # noqa: PT018
    assert image_only.token_ids is None and image_only.image is not None  # noqa: PT018


class AnyCaseBackend(ScriptedBackend):
    """The scripted backend for any input: case numbers folded into 1..4 (warmup's inputs are random)."""

    @staticmethod
    def cases(name, inputs):
        return (ScriptedBackend.cases(name, inputs) % 4) + 1


def test_warmup_runs_every_route_at_each_batch_size_and_every_operating_point_once():
    backend = AnyCaseBackend()
    pipeline = with_model(backend)
    batches: list[tuple[int, list[str], list[str | None]]] = []
    inputs_seen: list[PipelineInput] = []
    real = pipeline.predict

    def recording(inputs):
        batches.append((len(inputs), [x.route for x in inputs], [x.operating_point for x in inputs]))
        inputs_seen.extend(inputs)
        return real(inputs)

    pipeline.predict = recording
    pipeline.warmup((1, 3))

    assert batches == [
        *((1, [route], [None]) for route in ("text", "image", "full", "auto")),
        *((3, [route] * 3, [None] * 3) for route in ("text", "image", "full", "auto")),
        (1, ["auto"], ["balanced"]),
        (1, ["auto"], ["cheap"]),
    ]
    components = {name for name, _ in backend.calls}
    assert components == {"text_encoder", "image_glimpse", "router_a", "router_b", "text_head", "trunk",
                          "image_head", "full_head"}  # fmt: skip
    for x in inputs_seen:  # each a request of both modalities, as a client's would be
        assert x.token_ids.dtype == np.int64 and x.token_ids.shape == (4,)  # noqa: PT018
        assert set(x.token_ids.tolist()) <= {2, 3, 4, 5}  # words of the vocabulary, no padding or unknown
        assert x.image.dtype == np.uint8 and x.image.shape == (4, 4, 3)  # noqa: PT018
        assert x.text is None and x.spec_image is None  # noqa: PT018
    assert {i for x in inputs_seen for i in x.token_ids.tolist()} == {2, 3, 4, 5}  # every word drawn
    pixels = np.concatenate([x.image.ravel() for x in inputs_seen])
    assert pixels.min() < 16  # random pictures over the whole range
    assert pixels.max() > 240


def test_a_fallback_to_the_full_path_reuses_the_shared_trunk_its_first_pass_ran():
    """Case 2 routes to image (trunk -> image_head), sure at 0.7; under a floor of 0.9 the full path (trunk ->
    full_head) answers too, and the trunk, already run for it, is not run again."""
    backend = ScriptedBackend()
    outputs, _, calls = predict(with_model(backend), backend, request(2, min_confidence=0.9))

    assert (outputs[0].expert, outputs[0].fallback_from) == ("full", "image")
    assert [cases for name, cases in calls if name == "trunk"] == [[2]]
    assert [cases for name, cases in calls if name == "full_head"] == [[2]]
    assert outputs[0].probabilities == pytest.approx(np.array(PROBS["full"][2]), abs=1e-6)


def test_every_answers_arrays_are_float32_as_the_components_give_them():
    backend = ScriptedBackend()
    outputs, _, _ = predict(with_model(backend), backend, request(1), request(2, route="soft"), request(3, text=False))

    for output in outputs:
        arrays = [output.probabilities, output.route_scores, output.modality_weights, output.importance]
        assert [a.dtype for a in arrays] == [np.float32] * 4
    assert outputs[1].weights.dtype == np.float32


def test_two_answers_by_one_expert_each_get_their_own_calibrated_confidence():
    backend = ScriptedBackend()
    pipeline = with_model(backend, safety={"expert_temperatures": {"text": 2.0}})
    # Cases 1 and 4 both route to the text expert: (0.8, 0.1, 0.1) and (0.2, 0.3, 0.5).
    outputs, _, _ = predict(pipeline, backend, request(1), request(4))

    assert [o.expert for o in outputs] == ["text", "text"]
    assert [o.confidence for o in outputs] == pytest.approx(
        [tempered_top(PROBS["text"][1], 2.0), tempered_top(PROBS["text"][4], 2.0)], abs=1e-6
    )


class ElsewherePipeline(DynamicPipeline):
    """Runs its experts through an execution that keeps nothing of what they produced, as the Ray engine's does."""

    def execution(self, tensors, pixels, inputs):
        local = super().execution(tensors, pixels, inputs)

        class Remote:
            coalitions = local.coalitions
            run = local.run

        return Remote()


def test_an_execution_that_keeps_no_image_map_still_gives_each_answer_its_pvalue():
    backend = MapBackend()
    density = RecordingDensity()
    pipeline = ElsewherePipeline(dataclasses.replace(scripted_model(), ood=density), backend)
    outputs, _, _ = predict(pipeline, backend, request(2), request(3))

    assert [o.ood_pvalue for o in outputs] == pytest.approx([0.1, 0.2])
    assert (density.seen["map"], density.seen["map_rows"]) == (None, None)  # the features alone


def test_soft_fusion_weights_are_the_eligible_experts_router_weights_renormalized():
    # Two of three experts eligible, their router weights summing to 0.5: renormalized to 0.4 and 0.6.
    weights = _normalized(np.array([0.2, 0.3, 0.5], np.float32), np.array([True, True, False]))
    assert weights.tolist() == pytest.approx([0.4, 0.6, 0.0])
    assert weights.dtype == np.float32
    # Weights of numerically nothing: the eligible experts share equally.
    assert _normalized(np.array([1e-13, 0.0, 0.9]), np.array([True, True, False])).tolist() == [0.5, 0.5, 0.0]


def test_softmax_of_large_logits_is_a_distribution_row_by_row():
    # exp(1000) overflows a float64: each row is shifted by its own maximum first.
    probabilities = softmax(np.array([[1000.0, 0.0, 1000.0], [0.0, 0.0, 0.0], [-1000.0, -1000.0, -999.0]]))
    e = np.e
    expected = [[0.5, 0.0, 0.5], [1 / 3] * 3, [1 / (e + 2), 1 / (e + 2), e / (e + 2)]]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12)
