"""The importance figures the pages show (bench/results/importance.json) are what bench/importance.py measures on the
shipped model now: the held-out set is generated again from its recorded seed, and the API answers again."""

from __future__ import annotations

import json

import pytest

from bench import importance, importance_pages

pytestmark = pytest.mark.slow


def differences(recorded, computed, path: str = "") -> list[str]:
    """Every figure that differs by more than a near tie another CPU may break (one or two pairs of 1,200)."""
    if isinstance(recorded, dict):
        keys = set(recorded) | set(computed)
        return [d for k in sorted(keys) for d in differences(recorded.get(k), computed.get(k), f"{path}.{k}")]
    if isinstance(recorded, bool | str) or recorded is None:
        return [] if recorded == computed else [f"{path}: computed {computed}, recorded {recorded}"]
    if isinstance(recorded, int | float) and isinstance(computed, int | float):
        if recorded != recorded and computed != computed:  # both NaN
            return []
        ok = abs(recorded - computed) <= max(0.0025, 0.005 * abs(recorded))
        return [] if ok else [f"{path}: computed {computed}, recorded {recorded}"]
    return [f"{path}: computed {computed!r}, recorded {recorded!r}"]


def test_a_differing_figure_is_found():
    assert differences({"a": {"b": 0.5}}, {"a": {"b": 0.501}}) == []
    assert differences({"a": {"b": 0.5}}, {"a": {"b": 0.51}}) == [".a.b: computed 0.51, recorded 0.5"]
    assert differences({"a": 1}, {"a": 1, "b": 2}) == [".b: computed 2, recorded None"]


def test_the_recorded_importance_figures_are_what_the_shipped_model_answers(shipped_store, tmp_path_factory):
    from export.store import load_model
    from models.data.synthetic import SynthConfig, generate

    recorded = json.loads(importance_pages.RESULT.read_text())
    model = load_model(shipped_store, recorded["model"], recorded["version"])
    data = tmp_path_factory.mktemp("importance-heldout") / "data"
    config = SynthConfig(seed=recorded["held_out"]["seed"], image_size=model.preprocessing.image_size)
    generate(data, config, splits=importance.SPLITS, progress=False)

    computed = importance.measure(shipped_store, model.name, data)
    assert differences(recorded["splits"], computed) == [], "run python -m bench.importance --store store"
