"""Every figure README.md, docs/ and bench/BENCHMARKS.md show about the default model is what ``make figures``
computes from the shipped files (bench/figures.py)."""

from __future__ import annotations

import json

import pytest

from bench import figures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(figures.RESULT.read_text())


def test_every_figure_block_of_the_pages_is_what_the_recorded_figures_render(recorded):
    blocks = [(page, m["name"]) for page in figures.pages() for m in figures.BLOCK.finditer(page.read_text())]
    names = {name for _, name in blocks}
    assert names <= set(figures.RENDERERS), f"unknown figure blocks: {names - set(figures.RENDERERS)}"
    assert names == set(figures.RENDERERS), f"figures rendered nowhere: {set(figures.RENDERERS) - names}"
    assert figures.stale_blocks(recorded) == [], "run make figures (or python -m bench.figures --render)"


def test_the_recorded_figures_are_what_the_shipped_model_computes(recorded, tmp_path):
    computed, _ = figures.compute(timings=False, work=tmp_path)
    assert figures.differences(recorded, computed) == [], "run make figures"


def test_a_changed_figure_is_found(recorded):
    changed = json.loads(json.dumps(recorded))
    changed["policies"]["test"][0]["accuracy"] += 0.01  # twelve samples' worth: beyond the tolerance of one
    changed["experts"][0]["madds"] += 1
    assert figures.differences(recorded, changed) == [
        f"experts[0].madds: computed {changed['experts'][0]['madds']}, recorded {recorded['experts'][0]['madds']}",
        f"policies.test[0].accuracy: computed {changed['policies']['test'][0]['accuracy']}, "
        f"recorded {recorded['policies']['test'][0]['accuracy']}",
    ]
    changed = json.loads(json.dumps(recorded))
    changed["policies"]["test"][0]["accuracy"] += 1 / 1200  # one sample: a near tie another CPU may break
    changed.pop("timing", None)  # timings are the machine's: never compared
    assert figures.differences(recorded, changed) == []
    page = figures.REPO / "docs" / "models.md"
    assert figures.render_page(page.read_text(), changed, page) != page.read_text()
