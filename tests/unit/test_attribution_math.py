"""Attribution's math and plumbing (models/attribution.py, export/attribution.py): the Shapley values' axioms,
their normalization into importance, which components an expert reruns, and a model built to be symmetric."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export.attribution import EXACT, Answer, Attributor, ExpertAttribution, coalition_logits
from export.store import ComponentInfo, TensorInfo
from models import attribution
from models.attribution_training import fusion_plans, run_fusion
from models.dynamic_fusion import dynamic_fusion_tiny
from models.experts.late_fusion import FusionHead, LateFusionConfig


def test_a_worked_example_by_hand():
    # v(both) = 0, v(text only) = -1, v(image only) = -2, v(neither) = -3:
    # phi_text = 1/2 [(-1 + 3) + (0 + 2)] = 2, phi_image = 1/2 [(-2 + 3) + (0 + 1)] = 1.
    phi = attribution.shapley(np.array([[0.0, -1.0, -2.0, -3.0]]))
    assert phi.tolist() == [[2.0, 1.0]]
    assert attribution.shares(phi)[0].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_efficiency_dummy_and_symmetry_on_random_games():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(500, 4))
    phi = attribution.shapley(values)
    np.testing.assert_allclose(phi.sum(axis=1), values[:, 0] - values[:, 3], atol=1e-12)  # efficiency
    swapped = values[:, [0, 2, 1, 3]]  # text and image exchange parts
    np.testing.assert_allclose(attribution.shapley(swapped), phi[:, ::-1], atol=1e-12)  # symmetry
    dummy = values.copy()
    dummy[:, 1] = dummy[:, 3]  # the text adds nothing alone...
    dummy[:, 0] = dummy[:, 2]  # ...nor beside the image
    np.testing.assert_allclose(attribution.shapley(dummy)[:, 0], 0.0, atol=1e-12)


@pytest.mark.parametrize(
    ("phi", "expected"),
    [
        ((2.0, 1.0), (2 / 3, 1 / 3)),
        ((2.0, -0.5), (1.0, 0.0)),  # the image argued against the answer: it did not decide it
        ((-0.1, -0.3), (0.25, 0.75)),  # neither raised it: by the size of each
        ((0.0, 0.0), (0.5, 0.5)),
        ((0.0, 3.0), (0.0, 1.0)),
    ],
)
def test_importance_is_each_modality_s_share_of_what_raised_the_answer(phi, expected):
    shares = attribution.shares(np.array([phi]))
    assert shares[0].tolist() == pytest.approx(expected)
    assert shares.sum() == pytest.approx(1.0)


def test_one_modality_experts_give_exactly_one():
    assert attribution.one_modality(("text",), 2).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert attribution.one_modality(("image",), 1).tolist() == [[0.0, 1.0]]


def test_fusion_plans_name_the_components_that_read_both_and_the_tensors_each_modality_hands_them():
    plans = fusion_plans(dynamic_fusion_tiny())
    # Read from the families' own files: what each expert's first two-modality component takes.
    assert plans["late_fusion"].components == ("fusion_head",)
    assert plans["late_fusion"].inputs == {"text": ("text_features",), "image": ("image_features",)}
    assert plans["mulmix"].components == ("mulmix",)
    assert plans["mi2p"].components == ("mi2p",)
    assert plans["mi2p"].inputs == {"text": ("text_tokens", "token_ids"), "image": ("image_mid",)}
    assert plans["muse"].inputs == {"text": ("text_tokens", "token_ids"), "image": ("image_map",)}
    for expert in ("text", "image_lite", "image"):
        assert not plans[expert].reads_both
        assert plans[expert].components == ()


def test_an_expert_that_declares_a_modality_it_never_reads_is_refused():
    inputs = {"head": ("text_features",), "encoder": ("token_ids",)}
    outputs = {"head": ("logits",), "encoder": ("text_features",)}
    with pytest.raises(attribution.AttributionError, match="declares image but no component reads it"):
        attribution.plan_fusion("liar", ("text", "image"), ("head",), inputs, outputs)


def symmetric_head() -> FusionHead:
    """Late fusion whose text half and image half are the same weights: text and image play the same part."""
    model = SimpleNamespace(text_dim=4, image_widths=(4,), num_classes=3)
    head = FusionHead(model, LateFusionConfig(hidden=8, dropout=0.0)).eval()
    with torch.no_grad():
        first = head.mlp[0].weight
        first[:, 4:] = first[:, :4]
    return head


def test_a_model_built_to_be_symmetric_gets_equal_values_in_torch_and_in_the_served_code():
    head = symmetric_head()
    features = torch.randn(5, 4)
    tensors = {"text_features": features, "image_features": features.clone()}
    plan = attribution.FusionPlan(
        "sym", ("text", "image"), ("fusion_head",), {"text": ("text_features",), "image": ("image_features",)}
    )
    fake = SimpleNamespace(components={"fusion_head": head})
    with torch.no_grad():
        text_only, _ = run_fusion(fake, plan, tensors, {"image": torch.ones(5, dtype=torch.bool)})
        image_only, _ = run_fusion(fake, plan, tensors, {"text": torch.ones(5, dtype=torch.bool)})
        both = head(features, features)
    np.testing.assert_allclose(text_only.numpy(), image_only.numpy(), atol=1e-6)

    # The same through the serving side's code, with the head as a NumPy runner.
    def runner(_name):
        def run(inputs):
            with torch.no_grad():
                out = head(torch.from_numpy(inputs["text_features"]), torch.from_numpy(inputs["image_features"]))
            return {"logits": out.numpy()}

        return run

    info = ComponentInfo(
        "fusion_head",
        (TensorInfo("text_features", "float32", (-1, 4)), TensorInfo("image_features", "float32", (-1, 4))),
        (TensorInfo("logits", "float32", (-1, 3)),),
        madds=56,
        files={},
    )
    model = SimpleNamespace(components={"fusion_head": info}, labels=("a", "b", "c"), experts=())
    expert = ExpertAttribution(
        "sym", EXACT, ("text", "image"), np.log(np.full(3, 1 / 3)), ("fusion_head",),
        {"text": {"text_features": 0}, "image": {"image_features": 0}}, madds=112, explain_madds=112,
    )  # fmt: skip
    served = tensors | {}
    pairs = coalition_logits(model, expert, runner, lambda name: served[name].numpy(), EXACT)
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], atol=1e-6)
    np.testing.assert_allclose(pairs[:, 0], text_only.numpy(), atol=1e-6)

    attributor = Attributor.__new__(Attributor)
    attributor.model, attributor.experts = model, {"sym": expert}
    probabilities = torch.softmax(both, dim=1).numpy()
    for row in range(5):
        label = int(probabilities[row].argmax())
        answer = Answer(label, ["sym"], np.ones(1), [probabilities[row]], [{EXACT: pairs[row]}])
        explained = attributor.attribute(answer, explain=True)
        shapley = explained.explanation["shapley"]
        assert shapley["text"] == pytest.approx(shapley["image"], abs=1e-5)
        assert explained.importance.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
        log_prob = explained.explanation["log_prob"]
        assert log_prob["both"] == pytest.approx(math.log(probabilities[row, label]), abs=1e-5)
        assert shapley["text"] + shapley["image"] == pytest.approx(log_prob["both"] - log_prob["neither"], abs=1e-5)
