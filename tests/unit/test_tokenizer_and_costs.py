"""The tokenizer shared by training and serving, and the FLOP-counter cost measurement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.costs import count_madds, routing_costs
from models.registry import create_model
from models.tokenizer import PAD_ID, UNK_ID, Tokenizer


def test_tokenizer_pads_truncates_and_marks_unknown_words(tmp_path):
    tokenizer = Tokenizer.build(["A red circle.", "a blue square", "a red box"], max_tokens=4)
    assert tokenizer.vocab[:3] == ("<pad>", "<unk>", "a")  # most frequent first
    ids = tokenizer.encode("A RED zebra")
    assert ids[0] == tokenizer.vocab.index("a")
    assert ids[2] == UNK_ID
    assert ids[3] == PAD_ID
    assert len(tokenizer.encode("a red circle a blue square")) == 4
    tokenizer.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json") == tokenizer


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(10, 5)

    def forward(self, x):
        return self.layer(x)

    def example_inputs(self, batch_size):
        return (torch.randn(batch_size, 10),)


def test_madds_come_from_the_counter():
    assert count_madds(Linear()) == 10 * 5


def test_routing_costs_add_up():
    costs = routing_costs(create_model("dynamic_fusion_default"), full_expert="mi2p")
    c = costs["components"]
    shared = c["text_encoder"] + c["image_glimpse"] + c["router"]
    cnn = c["image_trunk"] + c["image_encoder"]
    assert costs["path"]["text"] == shared + c["text_head"]
    assert costs["path"]["image_lite"] == shared + c["image_lite"]
    assert costs["path"]["late_fusion"] == shared + cnn + c["fusion_head"]
    assert costs["path"]["mi2p"] == shared + c["image_trunk"] + c["mi2p"]  # its own later stages, not the encoder's
    assert costs["path"]["muse"] == shared + cnn + c["muse"]
    assert costs["full"] == costs["static"]["mi2p"] == c["text_encoder"] + c["image_trunk"] + c["mi2p"]
    assert costs["static"]["text"] == c["text_encoder"] + c["text_head"]
    assert costs["static"]["image"] == cnn + c["image_head"]  # no text encoder: the image expert reads no text
    # The router and its glimpse must stay cheap next to the full model (DESIGN: <= 5%).
    assert (c["router"] + c["image_glimpse"]) / costs["full"] <= 0.05


def test_the_full_path_is_known_only_once_it_is_chosen():
    costs = routing_costs(create_model("dynamic_fusion_tiny"))
    assert "full" not in costs
    assert routing_costs(create_model("dynamic_fusion_tiny"), "muse")["full"] == costs["static"]["muse"]


@pytest.mark.parametrize("preset", ["default", "large"])
def test_the_cnn_dominates_the_image_paths(preset):
    costs = routing_costs(create_model(f"dynamic_fusion_{preset}"), full_expert="late_fusion")
    c = costs["components"]
    assert (c["image_trunk"] + c["image_encoder"]) / costs["full"] > 0.85
    assert costs["path"]["text"] / costs["full"] < 0.1
