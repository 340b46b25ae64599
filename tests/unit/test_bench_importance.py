"""bench/importance.py's measures on values worked out by hand; the pages show the shipped model's recorded figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import importance_pages as pages
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


# -- the pages' importance blocks (bench/importance_pages.py) ----------------------------------------------------
@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(pages.RESULT.read_text())


def test_every_importance_block_of_the_pages_is_what_the_recorded_figures_render(recorded):
    assert pages.block_names() == set(pages.RENDERERS), "a block nobody renders, or a renderer no page shows"
    assert pages.stale_pages(recorded) == [], "run python -m bench.importance_pages (or python -m bench.importance)"


def test_a_changed_importance_figure_makes_its_pages_stale(recorded):
    changed = json.loads(json.dumps(recorded))
    changed["splits"]["test"]["agreement"]["sign"] -= 0.01
    assert "bench/BENCHMARKS.md" in pages.stale_pages(changed)
    changed = json.loads(json.dumps(recorded))
    changed["splits"]["test"]["image_share_by_kind"]["default"]["image_decides"] -= 0.01
    assert {"bench/BENCHMARKS.md", "docs/models.md"} <= set(pages.stale_pages(changed))


def test_the_recorded_importance_figures_are_of_the_shipped_model(recorded):
    shipped = json.loads((pages.REPO / "store" / "shapes" / "1" / "model.json").read_text())["provenance"]
    assert (recorded["model"], recorded["version"]) == ("shapes", "1")
    assert recorded["provenance"]["training_inputs"] == shipped["training_inputs"]["digest"], (
        "bench/results/importance.json is of another build of the default model: after make ship-default, run "
        "python -m bench.importance --store store"
    )
    assert recorded["provenance"]["commit"] == shipped["commit"]
