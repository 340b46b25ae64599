"""The cross-modal experts behave as their papers describe: MuSE's exchange and MI2P's injection."""

from __future__ import annotations

import pytest
import torch

from models.experts.mi2p import TextIntoImage
from models.experts.muse import exchange
from models.registry import create_model


def test_exchange_adds_the_other_modalitys_mean_to_the_least_attended_tokens():
    tokens = torch.zeros(1, 5, 2)
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.02, 0.08]])  # how much CLS attends to each token
    other_mean = torch.tensor([[1.0, -1.0]])

    out = exchange(tokens, attention, torch.ones(1, 5), other_mean, ratio=0.4)  # 40% of 5 tokens: 2

    changed = (out != 0).any(dim=2)[0].tolist()
    assert changed == [False, False, False, True, True]  # the two least attended, 0.02 and 0.08
    assert torch.equal(out[0, 3], other_mean[0])  # added to the token itself (a residual), which was zero


def test_exchange_never_picks_padding_and_always_exchanges_at_least_one_word():
    tokens = torch.zeros(2, 4, 1)
    attention = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    valid = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the first text has two words

    out = exchange(tokens, attention, valid, torch.ones(2, 1), ratio=0.1)

    assert out[0, :, 0].tolist() == [0.0, 1.0, 0.0, 0.0]  # the least attended WORD, not the padding after it
    assert out[1, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0]  # ceil(0.1 * 4) = 1


def test_exchange_ties_go_to_the_earlier_token():
    out = exchange(torch.zeros(1, 3, 1), torch.full((1, 3), 1 / 3), torch.ones(1, 3), torch.ones(1, 1), ratio=0.34)
    assert out[0, :, 0].tolist() == [1.0, 1.0, 0.0]  # ceil(0.34 * 3) = 2, all equal: positions 0 and 1


@pytest.mark.parametrize("expert", ["mi2p", "muse"])
def test_padded_words_change_nothing(expert):
    torch.manual_seed(0)
    model = create_model("dynamic_fusion_tiny").eval()
    module = model.components[expert]
    for parameter in module.parameters():  # away from the zero-initialized plug-ins
        torch.nn.init.normal_(parameter, std=0.3)
    inputs = list(module.example_inputs(4))
    tokens_index = module.input_names.index("text_tokens")
    token_ids = inputs[module.input_names.index("token_ids")]
    noisy = inputs.copy()
    noisy[tokens_index] = (
        inputs[tokens_index] + 5.0 * torch.randn_like(inputs[tokens_index]) * (token_ids == 0)[..., None]
    )
    assert (token_ids == 0).any(), "the example must have padding"
    with torch.no_grad():
        torch.testing.assert_close(module(*inputs), module(*noisy))


def test_a_text_into_image_plug_in_starts_as_the_identity():
    plug_in = TextIntoImage(channels=4, side=6, text_dim=8, heads=2, key_dim=3)
    feature_map = torch.randn(2, 4, 6, 6)
    words = torch.randn(2, 5, 8)
    assert torch.equal(plug_in(feature_map, words, torch.zeros(2, 5)), feature_map)


def test_mulmix_log_of_the_complement_is_exact_where_a_class_is_almost_certain():
    from models.experts.mulmix import log_one_minus

    logits = torch.tensor([[14.0, 0.0, -3.0, 1.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float32)
    exact = torch.log1p(-torch.softmax(logits.double(), dim=-1))  # float64: no cancellation to speak of
    stable = log_one_minus(torch.log_softmax(logits, dim=-1))
    assert torch.allclose(stable.double(), exact, rtol=1e-5, atol=1e-6)  # the almost-certain class too (-12.7)
