"""The dynamic pipeline's decisions and accounting on a scripted model: every component is a function that reads a
request's case number from its input and answers from the tables below, so each expected route, probability,
MAdds figure and component call is worked out by hand from those tables, with no trained weights and no export.

The model: labels cat, dog, owl; experts text (text_head), image (trunk -> image_head) and full (trunk ->
full_head, the full path); two operating points, "balanced" (router_a, the default) and "cheap" (router_b, a
temperature of 2). A request's case number rides in its first token and in every pixel of its image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import execution
from export.pipeline import DynamicPipeline, PipelineInput, RouteError
from export.store import ComponentInfo, ExpertInfo, OperatingPoint, StoredModel, TensorInfo
from models.preprocess import ImagePreprocessing
from models.tokenizer import Tokenizer

LABELS = ("cat", "dog", "owl")
EXPERTS = ("text", "image", "full")
MADDS = {"text_encoder": 10, "image_glimpse": 20, "router_a": 5, "router_b": 5,
         "text_head": 100, "trunk": 1000, "image_head": 200, "full_head": 3000}  # fmt: skip
SHARED = 10 + 20 + 5  # both encoders and a router
# Router scores (text, image, full) by operating point and case; "cheap" is calibrated at T=2 before use.
SCORES = {
    "router_a": {1: (0.7, 0.2, 0.1), 2: (0.1, 0.6, 0.3), 3: (0.2, 0.1, 0.7), 4: (0.45, 0.25, 0.3)},
    "router_b": {1: (0.8, 0.15, 0.05), 2: (0.5, 0.4, 0.1), 3: (0.6, 0.3, 0.1), 4: (0.3, 0.6, 0.1)},
}
WEIGHTS = {1: (0.5, 0.3, 0.2), 2: (0.2, 0.2, 0.6), 3: (0.0, 0.0, 0.0), 4: (0.25, 0.25, 0.5)}  # the fused weights
# Each expert's class probabilities by case (its logits are their logs).
PROBS = {
    "text": {1: (0.8, 0.1, 0.1), 2: (0.4, 0.35, 0.25), 3: (0.5, 0.3, 0.2), 4: (0.2, 0.3, 0.5)},
    "image": {1: (0.1, 0.8, 0.1), 2: (0.2, 0.7, 0.1), 3: (0.3, 0.3, 0.4), 4: (0.6, 0.2, 0.2)},
    "full": {1: (0.1, 0.1, 0.8), 2: (0.05, 0.9, 0.05), 3: (0.1, 0.2, 0.7), 4: (0.3, 0.4, 0.3)},
}


def tensor(name: str, *shape: int, dtype: str = "float32") -> TensorInfo:
    return TensorInfo(name, dtype, (-1, *shape))


COMPONENTS = {
    "text_encoder": ((tensor("token_ids", 4, dtype="int64"),),
                     (tensor("text_features", 2), tensor("text_tokens", 4, 2))),
    "image_glimpse": ((tensor("thumbnail", 3, 2, 2),), (tensor("glimpse_features", 2),)),
    "router_a": ((tensor("text_features", 2), tensor("glimpse_features", 2), tensor("text_present"),
                  tensor("image_present")), (tensor("expert_scores", 3), tensor("importance", 2),
                  tensor("expert_weights", 3))),
    "text_head": ((tensor("text_features", 2),), (tensor("logits", 3),)),
    "trunk": ((tensor("image", 3, 4, 4),), (tensor("image_mid", 2),)),
    "image_head": ((tensor("image_mid", 2),), (tensor("logits", 3),)),
    "full_head": ((tensor("image_mid", 2), tensor("text_features", 2)), (tensor("logits", 3),)),
}  # fmt: skip
COMPONENTS["router_b"] = COMPONENTS["router_a"]


def scripted_model() -> StoredModel:
    chains = {"text": ("text_head",), "image": ("trunk", "image_head"), "full": ("trunk", "full_head")}
    modalities = {"text": ("text",), "image": ("image",), "full": ("text", "image")}
    experts = tuple(
        ExpertInfo(name, modalities[name], chains[name], sum(MADDS[c] for c in chains[name]),
                   SHARED + sum(MADDS[c] for c in chains[name]))
        for name in EXPERTS
    )  # fmt: skip
    points = {
        "balanced": OperatingPoint("balanced", "router_a", 0.1, 1.0, {}),
        "cheap": OperatingPoint("cheap", "router_b", 0.5, 2.0, {}),
    }
    return StoredModel(
        name="scripted", version="1", path=Path("."), manifest={}, labels=LABELS,
        tokenizer=Tokenizer(vocab=("<pad>", "<unk>", "a", "b", "c", "d"), max_tokens=4),
        preprocessing=ImagePreprocessing(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        components={name: ComponentInfo(name, *COMPONENTS[name], MADDS[name], {}) for name in COMPONENTS},
        experts=experts, full_expert="full", router="router_a",
        shared_encoders={"text": "text_encoder", "image": "image_glimpse"},
        madds_full=SHARED - 5 + 4000, operating_points=points, default_point="balanced",
    )  # fmt: skip


class ScriptedBackend:
    """Runs each component as a function of the case numbers it reads; records every call's cases."""

    def __init__(self):
        self.calls: list[tuple[str, list[int]]] = []

    def load(self, component: ComponentInfo):
        name = component.name

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            cases = self.cases(name, inputs)
            self.calls.append((name, cases.tolist()))
            return self.outputs(name, cases, inputs)

        return run

    @staticmethod
    def cases(name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if name == "text_encoder":
            return inputs["token_ids"][:, 0]
        if name == "image_glimpse":
            return np.rint(inputs["thumbnail"][:, 0, 0, 0] * 255).astype(int)
        if name == "trunk":
            return np.rint(inputs["image"][:, 0, 0, 0] * 255).astype(int)
        if name.startswith("router"):
            return np.maximum(inputs["text_features"][:, 0], inputs["glimpse_features"][:, 0]).astype(int)
        return inputs.get("image_mid", inputs.get("text_features"))[:, 0].astype(int)

    @staticmethod
    def outputs(name: str, cases: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(cases)
        column = np.stack([cases, np.zeros(n)], axis=1).astype(np.float32)
        if name == "text_encoder":
            return {"text_features": column, "text_tokens": np.zeros((n, 4, 2), np.float32)}
        if name == "image_glimpse":
            return {"glimpse_features": column}
        if name == "trunk":
            return {"image_mid": column}
        if name.startswith("router"):
            scores = np.array([SCORES[name][c] for c in cases], np.float32)
            importance = (
                np.stack([inputs["text_present"], inputs["image_present"]], axis=1)
                / np.maximum(inputs["text_present"] + inputs["image_present"], 1)[:, None]
            )
            weights = np.array([WEIGHTS[c] for c in cases], np.float32)
            return {"expert_scores": scores, "importance": importance.astype(np.float32), "expert_weights": weights}
        expert = {"text_head": "text", "image_head": "image", "full_head": "full"}[name]
        return {"logits": np.log(np.array([PROBS[expert][c] for c in cases], np.float32))}


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def pipeline(backend) -> DynamicPipeline:
    return DynamicPipeline(scripted_model(), backend)


def request(case: int, *, text: bool = True, image: bool = True, **options) -> PipelineInput:
    return PipelineInput(
        token_ids=np.array([case, 0, 0, 0], np.int64) if text else None,
        image=np.full((4, 4, 3), case, np.uint8) if image else None,
        **options,
    )


def predict(pipeline, backend, *inputs):
    backend.calls.clear()
    outputs, seconds = pipeline.predict(list(inputs))
    return outputs, seconds, backend.calls


def runs_of(calls, component: str) -> list[list[int]]:
    return [cases for name, cases in calls if name == component]


def test_each_request_runs_the_expert_its_router_scores_highest_with_that_experts_probabilities(pipeline, backend):
    outputs, _, calls = predict(pipeline, backend, request(1), request(2), request(3))

    assert [(o.expert, o.decided_by, o.operating_point) for o in outputs] == [
        ("text", "router", "balanced"), ("image", "router", "balanced"), ("full", "router", "balanced")
    ]  # fmt: skip
    assert [o.label for o in outputs] == ["cat", "dog", "owl"]
    for output, (expert, case) in zip(outputs, [("text", 1), ("image", 2), ("full", 3)], strict=True):
        assert output.probabilities == pytest.approx(np.array(PROBS[expert][case]), abs=1e-6)
        assert output.route_scores == pytest.approx(np.array(SCORES["router_a"][case]), abs=1e-6)
        assert (output.weights, output.fallback_from) == (None, None)
    assert [o.madds for o in outputs] == [SHARED + 100, SHARED + 1000 + 200, SHARED + 1000 + 3000]
    # Every component once, on exactly the requests that need it: the trunk once for the image and full requests.
    assert calls == [
        ("text_encoder", [1, 2, 3]), ("image_glimpse", [1, 2, 3]), ("router_a", [1, 2, 3]),
        ("text_head", [1]), ("trunk", [2, 3]), ("image_head", [2]), ("full_head", [3]),
    ]  # fmt: skip


def test_a_missing_modality_keeps_to_the_experts_that_need_only_what_the_request_has(pipeline, backend):
    outputs, _, calls = predict(pipeline, backend, request(3, image=False), request(1, text=False))

    assert [(o.expert, o.decided_by) for o in outputs] == [("text", "missing_modality"), ("image", "missing_modality")]
    assert [o.madds for o in outputs] == [10 + 5 + 100, 20 + 5 + 1000 + 200]  # only the encoder it has
    assert [o.importance.tolist() for o in outputs] == [[1.0, 0.0], [0.0, 1.0]]
    assert runs_of(calls, "text_encoder") == [[3]]
    assert runs_of(calls, "image_glimpse") == [[1]]


def test_a_threshold_escalates_an_unsure_cheaper_pick_to_the_full_path(pipeline, backend):
    outputs, _, calls = predict(pipeline, backend, request(4, threshold=0.5), request(1, threshold=0.5))

    assert [(o.expert, o.decided_by) for o in outputs] == [("full", "threshold"), ("text", "router")]
    assert outputs[0].probabilities == pytest.approx(np.array(PROBS["full"][4]), abs=1e-6)
    assert [o.madds for o in outputs] == [SHARED + 4000, SHARED + 100]
    assert runs_of(calls, "text_head") == [[1]]  # the escalated request never ran its cheaper pick


def test_a_forced_route_runs_that_expert_whatever_the_router_says(pipeline, backend):
    outputs, _, _ = predict(pipeline, backend, request(1, route="full"), request(3, route="text", text=True))

    assert [(o.expert, o.decided_by) for o in outputs] == [("full", "request"), ("text", "request")]
    assert outputs[0].probabilities == pytest.approx(np.array(PROBS["full"][1]), abs=1e-6)
    assert outputs[1].label == "cat"


def test_a_confidence_floor_runs_the_full_path_too_and_counts_both(pipeline, backend):
    # Case 4 routes to text (0.45) whose top probability is 0.5; case 2 routes to image, sure at 0.7.
    outputs, _, calls = predict(
        pipeline, backend, request(4, min_confidence=0.6), request(2, min_confidence=0.6), request(3, min_confidence=1)
    )

    fell_back, kept, full = outputs
    assert (fell_back.expert, fell_back.decided_by, fell_back.fallback_from) == ("full", "confidence", "text")
    assert fell_back.probabilities == pytest.approx(np.array(PROBS["full"][4]), abs=1e-6)
    assert fell_back.madds == SHARED + 100 + 1000 + 3000  # both paths; the trunk once
    assert (kept.expert, kept.decided_by, kept.fallback_from) == ("image", "router", None)
    assert (full.expert, full.decided_by) == ("full", "router")  # nothing cheaper to fall back from
    # The fallback's trunk runs for case 4 alone: cases 2 and 3 had theirs in the first pass.
    assert runs_of(calls, "trunk") == [[2, 3], [4]]
    assert runs_of(calls, "full_head") == [[3], [4]]


def test_soft_fusion_mixes_every_eligible_experts_probabilities_by_the_fused_weights(pipeline, backend):
    outputs, _, calls = predict(pipeline, backend, request(1, route="soft"), request(2, route="soft", text=False))

    both, image_only = outputs
    weights = np.array(WEIGHTS[1])
    assert (both.expert, both.decided_by) == ("soft", "request")
    assert both.weights == pytest.approx(weights, abs=1e-6)
    mixed = sum(w * np.array(PROBS[e][1]) for w, e in zip(weights, EXPERTS, strict=True))
    assert both.probabilities == pytest.approx(mixed, abs=1e-6)
    assert both.madds == SHARED + 100 + 1000 + 200 + 3000  # every expert, the shared trunk counted once
    # Without text only the image expert is eligible: all the weight goes to it.
    assert image_only.weights == pytest.approx(np.array([0.0, 1.0, 0.0]), abs=1e-6)
    assert image_only.probabilities == pytest.approx(np.array(PROBS["image"][2]), abs=1e-6)
    assert runs_of(calls, "trunk") == [[1, 2]]


def test_soft_fusion_shares_equally_when_the_router_weighs_every_eligible_expert_at_zero(pipeline, backend):
    outputs, _, _ = predict(pipeline, backend, request(3, route="soft"))

    assert outputs[0].weights == pytest.approx(np.full(3, 1 / 3), abs=1e-6)
    mixed = sum(np.array(PROBS[e][3]) for e in EXPERTS) / 3
    assert outputs[0].probabilities == pytest.approx(mixed, abs=1e-6)


def test_an_operating_point_is_its_own_router_with_its_own_calibration(pipeline, backend):
    outputs, _, calls = predict(pipeline, backend, request(2, operating_point="cheap"), request(2))

    cheap, balanced = outputs
    scaled = np.sqrt(np.array(SCORES["router_b"][2]))  # softmax(log p / 2) = sqrt(p) / sum
    assert cheap.route_scores == pytest.approx(scaled / scaled.sum(), abs=1e-6)
    assert (cheap.expert, cheap.operating_point) == ("text", "cheap")
    assert (balanced.expert, balanced.operating_point) == ("image", "balanced")
    assert cheap.madds == SHARED + 100
    assert runs_of(calls, "router_b") == [[2]] and runs_of(calls, "router_a") == [[2]]  # noqa: PT018


def test_routes_and_operating_points_the_model_lacks_are_refused_by_name(pipeline):
    with pytest.raises(RouteError, match="unknown route 'gpt'; use 'auto', 'soft' or one of: text, image, full"):
        pipeline.predict([request(1, route="gpt")])
    with pytest.raises(RouteError, match="route 'full' needs image, which the request does not carry"):
        pipeline.predict([request(1, image=False, route="full")])
    with pytest.raises(RouteError, match="route 'image' needs image"):
        pipeline.check_route("image", has_text=True, has_image=False)
    pipeline.check_route("text", has_text=True, has_image=False)  # what it needs, it has
    with pytest.raises(RouteError, match="unknown operating_point 'fast'; this model has: balanced, cheap"):
        pipeline.predict([request(1, operating_point="fast")])


def test_each_expert_is_timed_with_a_shared_component_split_by_its_requests(pipeline, backend, monkeypatch):
    ticks = iter(range(0, 1000, 1))
    monkeypatch.setattr(execution.time, "perf_counter", lambda: float(next(ticks)))  # every component takes 1 s

    _, seconds, _ = predict(pipeline, backend, request(2), request(3), request(3), request(1))

    # trunk (1 s) for one image and two full requests: a third to image, two thirds to full; then each head 1 s.
    assert seconds == pytest.approx({"text": 1.0, "image": 1 + 1 / 3, "full": 1 + 2 / 3})


def test_outputs_come_back_in_request_order_for_any_mix(pipeline, backend):
    order = [3, 1, 4, 2, 1, 3]
    outputs, _, _ = predict(pipeline, backend, *(request(c) for c in order))

    expected = {1: "text", 2: "image", 3: "full", 4: "text"}
    assert [o.expert for o in outputs] == [expected[c] for c in order]
    for output, case in zip(outputs, order, strict=True):
        assert output.probabilities == pytest.approx(np.array(PROBS[expected[case]][case]), abs=1e-6)


def test_a_confidence_floor_never_overrides_a_forced_route_or_soft_fusion(pipeline, backend):
    # Case 4: the text expert's top probability is 0.5, and soft fusion's (0.25 text, 0.25 image, 0.5 full) is 0.35.
    outputs, _, calls = predict(
        pipeline, backend, request(4, route="text", min_confidence=0.9), request(4, route="soft", min_confidence=0.9)
    )

    assert [(o.expert, o.decided_by, o.fallback_from) for o in outputs] == [
        ("text", "request", None), ("soft", "request", None)
    ]  # fmt: skip
    assert runs_of(calls, "full_head") == [[4]]  # once, for the soft mixture: no fallback pass


def test_a_fallback_remembers_the_label_of_the_cheaper_answer_it_replaced(pipeline, backend):
    outputs, _, _ = predict(pipeline, backend, request(4, min_confidence=0.6), request(1, min_confidence=0.6))

    fell_back, kept = outputs
    assert (fell_back.label, fell_back.fallback_from, fell_back.fallback_label) == ("dog", "text", "owl")
    assert (kept.label, kept.fallback_label) == ("cat", None)


def test_the_flags_the_server_sets_pass_through_to_each_answer(pipeline, backend):
    outputs, _, _ = predict(pipeline, backend, request(1, degraded=True), request(1, guarded=True), request(1))

    assert [(o.degraded, o.guarded) for o in outputs] == [(True, False), (False, True), (False, False)]


def test_each_answer_reports_its_routers_modality_weights(pipeline, backend):
    # The scripted router weighs each present modality equally.
    outputs, _, _ = predict(pipeline, backend, request(1), request(2, text=False), request(3, image=False))

    assert [o.modality_weights.tolist() for o in outputs] == [[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]]


def test_a_fallbacks_time_counts_in_the_full_paths_seconds(pipeline, backend, monkeypatch):
    ticks = iter(range(0, 1000, 1))
    monkeypatch.setattr(execution.time, "perf_counter", lambda: float(next(ticks)))  # every component takes 1 s

    _, seconds, calls = predict(pipeline, backend, request(3), request(4, min_confidence=0.6))

    # First pass: text_head (case 4), trunk and full_head (case 3); the fallback: trunk and full_head for case 4.
    assert runs_of(calls, "full_head") == [[3], [4]]
    assert seconds == pytest.approx({"text": 1.0, "full": 4.0})
    # The full path first runs in the fallback: its time is the fallback's alone.
    _, seconds, _ = predict(pipeline, backend, request(4, min_confidence=0.6))
    assert seconds == pytest.approx({"text": 1.0, "full": 2.0})


def test_a_route_missing_what_it_needs_names_each_modality(pipeline):
    with pytest.raises(RouteError, match="route 'text' needs text, which the request does not carry"):
        pipeline.check_route("text", has_text=False, has_image=True)
    with pytest.raises(RouteError, match="route 'full' needs text and image, which"):
        pipeline.check_route("full", has_text=False, has_image=False)


def test_the_components_loaded_at_start_are_the_encoders_the_served_router_and_every_experts_chain(pipeline):
    assert pipeline.served_components() == {
        "text_encoder", "image_glimpse", "router_a", "text_head", "trunk", "image_head", "full_head"
    }  # fmt: skip


def test_predict_refuses_an_empty_batch_and_a_request_with_nothing_in_it(pipeline):
    with pytest.raises(AssertionError, match="^predict needs at least one input$"):
        pipeline.predict([])
    with pytest.raises(AssertionError, match="^every input needs text or an image$"):
        pipeline.predict([request(1, text=False, image=False)])
