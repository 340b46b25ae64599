"""The captions Stage II adds to validation: words dropped one by one, and a share of the vocabulary forgotten (every
occurrence of a forgotten word <unk>, as captions from an unseen family read)."""

from __future__ import annotations

import pytest
import torch

from models.tokenizer import PAD_ID, UNK_ID
from models.training import TrainConfig, caption_variant_names, drop_words, forget_words

# Eight captions over a vocabulary of ids 2..41, padded; every caption repeats its first word at its end.
WORDS = torch.arange(2, 42).reshape(8, 5)
CAPTIONS = torch.cat([WORDS, WORDS[:, :1], torch.full((8, 3), PAD_ID)], dim=1)


def test_a_forgotten_word_is_unk_wherever_it_occurs_and_other_words_stay():
    forgotten = forget_words(CAPTIONS, 0.5, torch.Generator().manual_seed(3))

    fate = {}  # word -> forgotten?
    for word, now in zip(CAPTIONS.flatten().tolist(), forgotten.flatten().tolist(), strict=True):
        if word == PAD_ID:
            assert now == PAD_ID
            continue
        assert now in (word, UNK_ID)
        assert fate.setdefault(word, now == UNK_ID) == (now == UNK_ID), f"word {word} forgotten in one place only"
    assert 0 < sum(fate.values()) < len(fate)  # at rate 0.5, some of 40 words go and some stay


def test_captions_that_are_all_padding_come_back_as_they_are():
    """An image-only data set: no words to forget, and nothing to fail on."""
    empty = torch.full((4, 6), PAD_ID)
    assert torch.equal(forget_words(empty, 0.8, torch.Generator().manual_seed(0)), empty)
    assert torch.equal(forget_words(empty[:0], 0.8, torch.Generator().manual_seed(0)), empty[:0])


def test_the_share_forgotten_follows_the_rate():
    vocabulary = torch.arange(2, 2002).reshape(1, -1)
    for rate in (0.2, 0.8):
        forgotten = forget_words(vocabulary, rate, torch.Generator().manual_seed(0))
        assert (forgotten == UNK_ID).float().mean().item() == pytest.approx(rate, abs=0.04)


def test_dropping_words_one_by_one_can_keep_a_word_in_one_place_and_lose_it_in_another():
    """What tells the two kinds apart: each occurrence is dropped on its own."""
    dropped = drop_words(CAPTIONS, 0.5, torch.Generator().manual_seed(3))
    first, last = dropped[:, 0], dropped[:, 5]  # the same word in each caption
    assert bool(((first == UNK_ID) != (last == UNK_ID)).any())


def test_the_copies_are_named_in_the_order_they_are_made():
    config = TrainConfig(stage2_word_dropout=(0.3,), stage2_vocab_dropout=(0.2, 0.6), stage2_vocab_draws=2)
    assert caption_variant_names(config) == ["words_0.3", "vocabulary_0.2#1", "vocabulary_0.6#1",
                                             "vocabulary_0.2#2", "vocabulary_0.6#2"]  # fmt: skip
    assert caption_variant_names(TrainConfig(stage2_word_dropout=(), stage2_vocab_dropout=())) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage2_vocab_dropout": (0.0,)}, "stage2_vocab_dropout values must be in (0, 1)"),
        ({"stage2_vocab_dropout": (1.0,)}, "stage2_vocab_dropout values must be in (0, 1)"),
        ({"stage2_vocab_draws": 0}, "stage2_vocab_draws must be at least 1"),
        ({"stage2_vocab_draws": 1.5}, "stage2_vocab_draws must be an integer"),
        ({"stage2_vocab_draws": True}, "stage2_vocab_draws must be an integer"),
    ],
)
def test_a_config_with_impossible_copies_is_refused_with_the_field_named(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**options)
