"""What export measures for "is routing still safe?" and writes into the store (export/safety.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.store import IntegrityError, load_model
from models.safety import CONFIDENCE_FLOORS


def test_model_json_holds_the_safety_figures_of_every_operating_point(manifest):
    safety = manifest["safety"]
    experts = [e["name"] for e in manifest["experts"]]
    routers = {r["name"]: r for r in manifest["routers"]}
    assert set(safety["expert_temperatures"]) == set(experts)
    assert all(t > 0 for t in safety["expert_temperatures"].values())
    assert set(safety["operating_points"]) == set(routers) == set(safety["guard"])
    full = manifest["full_expert"]
    for name, point in safety["operating_points"].items():
        assert 0.0 <= point["agreement"] <= 1.0
        # The same cross-fitted routes as the point's validation route mix: what it does not send to full.
        assert point["cheaper_share"] == pytest.approx(1.0 - routers[name]["validation"]["route_mix"][full])
        answers = sum(e["answers"] for e in point["by_expert"].values())
        assert answers == pytest.approx(point["cheaper_share"] * safety["samples"])
        guard = safety["guard"][name]
        assert guard["operating_point"] == name
        assert guard["min_confidence"] in (None, *CONFIDENCE_FLOORS)
    policies = {p["policy"] for p in safety["policies"]}
    assert len(policies) == len(routers) * (1 + len(CONFIDENCE_FLOORS))


def test_the_out_of_distribution_density_is_a_verified_file_of_the_version(store_copy):
    [version] = list(store_copy.glob("shapes/*"))
    manifest = json.loads((version / "model.json").read_text())
    entry = manifest["safety"]["ood"]
    assert manifest["files"][entry["file"]]["sha256"] == entry["sha256"]
    assert entry["fitted_on"] == {"split": "val", "samples": manifest["training"]["data"]["sizes"]["val"]}
    model = load_model(store_copy)
    assert set(model.ood.views) == {"both", "text", "image", "image_map"}
    with np.load(version / entry["file"]) as arrays:
        changed = {name: arrays[name] for name in arrays.files}
    changed["both.mean"] = changed["both.mean"] + 1.0
    np.savez(version / entry["file"], **changed)
    with pytest.raises(IntegrityError, match=entry["file"]):
        load_model(store_copy)
