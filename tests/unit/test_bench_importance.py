"""bench/importance.py's measures, on values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bench.importance import auroc, deletion, sign_agreement


def test_auroc_counts_pairs_ranked_right_and_ties_as_half():
    # 3 x 2 pairs: 0.9 beats both, 0.5 beats 0.2 and ties 0.5, 0.1 beats neither: (2 + 1.5 + 0) / 6.
    assert auroc(np.array([0.9, 0.5, 0.1]), np.array([0.2, 0.5])) == pytest.approx(3.5 / 6)
    assert auroc(np.array([1.0]), np.array([0.0])) == 1.0


def test_sign_agreement_is_about_which_modality_counted_more():
    first = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.1, 0.9]])
    second = np.array([[0.4, 0.6], [0.3, 0.7], [0.5, 0.5], [0.0, 1.0]])
    assert sign_agreement(first, second) == 0.75  # the second row flips


def test_deletion_counts_only_pairs_where_exactly_one_removal_changes_the_label():
    labels = ["a", "a", "a", "a"]
    without_image = ["a", "b", "b", "a"]  # row 1: only the image's removal changes it; row 2: both do
    without_text = ["c", "a", "c", "a"]  # row 0: only the text's; row 3: neither
    importance = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]])
    result = deletion(labels, without_image, without_text, importance)
    assert result == {"pairs": 2, "text_decided": 1, "image_decided": 1, "rated_higher": 0.5}
