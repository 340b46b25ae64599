"""DRDF's dual router and MWF layer, exactly as PAPERS.md gives them."""

from __future__ import annotations

import pytest
import torch

from models.registry import create_model
from models.router import STD_EPSILON, DualRouter, modal_weight_fusion, modality_importance

ONE, ZERO = torch.ones(1), torch.zeros(1)


def importance_of(omega_text, omega_image, text=ONE, image=ONE):
    return modality_importance(torch.tensor([omega_text]), torch.tensor([omega_image]), text, image)[0].tolist()


def test_importance_is_each_routers_share_of_the_spread():
    omega_text, omega_image = [0.9, 0.1, 0.2], [0.5, 0.4, 0.6]
    std_text = torch.tensor(omega_text).std(unbiased=False).item()
    std_image = torch.tensor(omega_image).std(unbiased=False).item()

    text, image = importance_of(omega_text, omega_image)

    assert text == pytest.approx(std_text / (std_text + std_image), abs=1e-3)
    assert text + image == pytest.approx(1.0)
    assert text > 0.8  # the decisive router dominates


def test_two_flat_routers_share_importance_equally():
    assert importance_of([0.3, 0.3, 0.3], [0.8, 0.8, 0.8]) == pytest.approx([0.5, 0.5])


def test_a_modality_alone_has_importance_one():
    assert importance_of([0.9, 0.1, 0.2], [0.5, 0.4, 0.6], text=ONE, image=ZERO) == [1.0, 0.0]
    assert importance_of([0.9, 0.1, 0.2], [0.5, 0.4, 0.6], text=ZERO, image=ONE) == [0.0, 1.0]


def test_the_smoothing_epsilon_is_negligible_for_decisive_routers():
    text, _ = importance_of([1.0, 0.0, 0.0], [0.6, 0.4, 0.5])
    exact = 0.4714 / (0.4714 + 0.0816)
    assert text == pytest.approx(exact, abs=10 * STD_EPSILON)


@pytest.fixture
def router() -> DualRouter:
    torch.manual_seed(0)
    model = create_model("dynamic_fusion_tiny")
    router = model.router
    for layer in (router.text_router[-1], router.image_router[-1]):  # away from the neutral start
        torch.nn.init.normal_(layer.weight, std=2.0)
    return router.eval()


def test_scores_are_a_softmax_of_the_fused_weights_log_odds(router):
    text_features, glimpse_features, text_present, image_present = router.example_inputs(9)
    with torch.no_grad():
        scores, importance, weights = router(text_features, glimpse_features, text_present, image_present)
        omega_text = torch.sigmoid(router.text_router(text_features))
        omega_image = torch.sigmoid(router.image_router(glimpse_features))
        fused, reference_importance = modal_weight_fusion(omega_text, omega_image, text_present, image_present)

    torch.testing.assert_close(importance, reference_importance)
    log_odds = torch.log(fused / (1 - fused))
    torch.testing.assert_close(scores, torch.softmax(log_odds, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.sum(1), torch.ones(9))
    assert torch.equal(scores.argmax(1), fused.argmax(1))  # the served expert is the fused weights' argmax
    torch.testing.assert_close(weights, fused, atol=1e-5, rtol=1e-4)  # what soft fusion mixes with


def test_two_saturated_weights_stay_apart_in_the_gate(router):
    """Sigmoid weights of 1 - 1e-9 and 1 - 1e-6 tie as log(omega); their log-odds keep them apart."""
    text_features, glimpse_features, _, _ = router.example_inputs(1)
    ones = torch.ones(1)
    for layer, logits in ((router.text_router[-1], [20.0, 14.0, -5.0]), (router.image_router[-1], [0.0, 0.0, 0.0])):
        torch.nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.tensor(logits + [-5.0] * (layer.bias.numel() - 3)))
    with torch.no_grad():
        gate_logits, _ = router.gate_logits(text_features, glimpse_features, ones, torch.zeros(1))
    assert float(gate_logits[0, 0] - gate_logits[0, 1]) == pytest.approx(6.0, abs=1e-3)


def test_scores_stay_finite_when_every_weight_underflows(router):
    text_features, glimpse_features, text_present, image_present = router.example_inputs(4)
    for layer in (router.text_router[-1], router.image_router[-1]):
        torch.nn.init.constant_(layer.bias, -500.0)  # sigmoid(-500) is 0 in float32
    with torch.no_grad():
        scores, importance, _ = router(text_features, glimpse_features, text_present, image_present)
    assert torch.isfinite(scores).all()
    assert torch.isfinite(importance).all()


def test_gradients_are_finite_from_the_neutral_start():
    model = create_model("dynamic_fusion_tiny")
    inputs = model.router.example_inputs(6)
    gate_logits, _ = model.router.gate_logits(*inputs)
    gate_logits[:, 0].sum().backward()
    for parameter in model.router.parameters():
        assert torch.isfinite(parameter.grad).all()
