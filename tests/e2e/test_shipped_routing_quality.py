"""The shipped default model, served by ``dynfuse serve`` with its defaults, routes well on data it never saw: over a
held-out test split (the model's own generator at another seed), the answers of ``auto`` are within the documented
accuracy of the full path's (docs/models.md: the served router is the cheapest within 0.5 points of the full path
on validation), and save MAdds as model.json says they do.

The expected values come from the data's labels and from model.json's figures measured at training, not from the
server: accuracy is counted here, against the generator's labels, from what the HTTP API answered."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import httpx
import pytest
from conftest import MODEL_NAME

pytestmark = pytest.mark.e2e

HELD_OUT_SEED = 11  # not the training data's seed (model.json training.data.dir: "-s0-")
HELD_OUT_SIZE = 8000  # as the training data: a test split of 1,200 pairs
DOCUMENTED_DROP_POINTS = 0.5  # docs/models.md: the served router is within 0.5 points of the full path
BATCH = 64  # /v1/classify/batch's default limit of inputs


@pytest.fixture(scope="module")
def held_out(shipped_store, tmp_path_factory) -> tuple[list[dict], dict]:
    from models.data.synthetic import SynthConfig, generate

    manifest = json.loads(next(shipped_store.glob(f"{MODEL_NAME}/*/model.json")).read_text())
    assert "-s0-" in Path(manifest["training"]["data"]["dir"]).name, "the held-out seed must differ from training's"
    out = tmp_path_factory.mktemp("heldout")
    size = manifest["preprocessing"]["image_size"]
    generate(out, SynthConfig(size=HELD_OUT_SIZE, seed=HELD_OUT_SEED, image_size=size, ood_size=0), progress=False)
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row["png"] = (out / row["img"]).read_bytes()
    return rows, manifest


def classify_all(base: str, rows: list[dict], **fields) -> list[dict]:
    answers = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for start in range(0, len(rows), BATCH):
            inputs = [
                {"image": base64.b64encode(r["png"]).decode(), "text": r["text"]} for r in rows[start : start + BATCH]
            ]
            response = client.post("/v1/classify/batch", json={"inputs": inputs, **fields})
            assert response.status_code == 200, response.text
            answers += response.json()["outputs"]
    return answers


def test_the_shipped_model_served_routes_within_its_documented_accuracy_of_the_full_path(server_process, held_out):
    rows, manifest = held_out
    _, base = server_process()  # the shipped store, dynfuse serve's defaults (one worker)
    full_expert = manifest["full_expert"]
    served = httpx.get(f"{base}/v1/models/{MODEL_NAME}", timeout=10).json()
    assert served["version"] == manifest["version"]
    assert served["default_operating_point"] == manifest["router"]["operating_point"]

    auto = classify_all(base, rows)
    full = classify_all(base, rows, route=full_expert)

    assert {a["route"]["expert"] for a in full} == {full_expert}
    n = len(rows)
    right_auto = [a["label"] == r["label"] for a, r in zip(auto, rows, strict=True)]
    right_full = [a["label"] == r["label"] for a, r in zip(full, rows, strict=True)]
    accuracy_auto, accuracy_full = sum(right_auto) / n, sum(right_full) / n
    # The paired difference's sampling error: only the pairs one policy gets right and the other wrong move it
    # (McNemar); three standard errors of it on top of the documented drop.
    discordant = sum(a != f for a, f in zip(right_auto, right_full, strict=True))
    slack_points = 100 * 3 * math.sqrt(discordant) / n
    drop_points = 100 * (accuracy_full - accuracy_auto)
    figures = f"auto {accuracy_auto:.4f}, full {accuracy_full:.4f} on {n} held-out pairs, {discordant} discordant"
    assert drop_points <= DOCUMENTED_DROP_POINTS + slack_points, figures
    # The full path's accuracy is the model's recorded one on its own test split, up to the same kind of error.
    recorded_full = manifest["evaluation"]["summary"]["full_accuracy"]
    assert abs(accuracy_full - recorded_full) <= 3 * math.sqrt(recorded_full * (1 - recorded_full) / n) + 0.01, figures

    # Routing saves what model.json says it saves: MAdds as counted by the server, per answer.
    madds_auto = sum(a["compute"]["madds"] for a in auto) / n
    madds_full = sum(a["compute"]["madds"] for a in full) / n
    saved = 1 - madds_auto / madds_full
    recorded_saved = manifest["evaluation"]["summary"]["auto_saved_ratio"]
    assert saved == pytest.approx(recorded_saved, abs=0.05), (saved, recorded_saved)
    assert len({a["route"]["expert"] for a in auto}) >= 3, "auto sends the pairs down several paths"
