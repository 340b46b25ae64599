"""``dynfuse train`` on the tiny preset: the run directory, reproducibility, clean failure."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quiet

from models.data.manifest import ManifestError
from models.training import CHECKPOINT, SUMMARY, TrainConfig, load_run, rebuild_model, rebuild_routers, train


def test_the_run_directory_rebuilds_the_model_from_the_checkpoint_alone(tiny_run):
    checkpoint = load_run(tiny_run)
    model = rebuild_model(checkpoint)
    routers = rebuild_routers(checkpoint, model)

    assert set(routers) == {"lambda_0", "lambda_0.3"}
    assert checkpoint["default_router"] in routers
    assert checkpoint["labels"] == sorted(checkpoint["labels"])
    assert len(checkpoint["labels"]) == 12
    assert checkpoint["tokenizer"]["vocab"][:2] == ["<pad>", "<unk>"]
    # The full path is the most accurate expert on validation, and madds_full is that expert as a static model.
    full = checkpoint["full_expert"]
    validation = {row["policy"]: row for row in checkpoint["evaluation"]["val"]}
    static_accuracy = {e: validation[f"static:{e}"]["accuracy"] for e in validation["auto"]["route_mix"]}
    assert static_accuracy[full] == max(static_accuracy.values())
    assert checkpoint["madds"]["full"] == checkpoint["madds"]["static"][full]
    summary = json.loads((tiny_run / SUMMARY).read_text())
    policies = {row["policy"] for row in summary["evaluation"]["test"]}
    assert {"full", "cheap", "auto", "oracle", "lambda=0", "lambda=0.3"} <= policies
    assert {row["policy"] for row in summary["evaluation"]["test_ood"]} == policies  # the held-out captions too
    assert [h["stage"] for h in summary["history"]] == [1] * TrainConfig(preset="tiny").epochs
    # Stage I learned something: the full expert beats chance (1/12) by far on the tiny data.
    assert summary["evaluation"]["summary"]["full_accuracy"] > 0.5
    tokens = torch.zeros(2, model.config.max_tokens, dtype=torch.int64)
    images = torch.zeros(2, 3, model.config.image_size, model.config.image_size)
    assert model.expert_logits(tokens, images)["late_fusion"].shape == (2, 12)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_metrics(tiny_data, tmp_path):
    # Short runs: reproducibility does not depend on how long a run trains, and three full ones took minutes.
    def evaluation(name: str, seed: int) -> dict:
        config = TrainConfig(preset="tiny", lambdas=(0.0, 0.3), seed=seed, stage1_epochs=3, stage2_epochs=20)
        train(tiny_data, tmp_path / name, config, progress=False, log=quiet)
        return json.loads((tmp_path / name / SUMMARY).read_text())["evaluation"]

    first = evaluation("first", seed=0)
    assert evaluation("again", seed=0) == first
    assert evaluation("other", seed=1) != first  # and the comparison can tell runs apart


def test_bad_data_names_the_line_and_leaves_no_run_directory(tiny_data, tmp_path):
    import shutil

    data = shutil.copytree(tiny_data, tmp_path / "data")
    lines = (data / "val.jsonl").read_text().splitlines()
    broken = json.loads(lines[3])
    (data / broken["img"]).write_bytes(b"not a png")
    run = tmp_path / "run"

    with pytest.raises(ManifestError, match=r"val\.jsonl:4: image .* cannot be read"):
        train(data, run, TrainConfig(preset="tiny", lambdas=(0.0,), stage1_epochs=1), progress=False, log=quiet)
    assert not run.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_an_unknown_label_in_validation_is_named(tiny_data, tmp_path):
    import shutil

    data = shutil.copytree(tiny_data, tmp_path / "data")
    lines = (data / "val.jsonl").read_text().splitlines()
    entry = json.loads(lines[0]) | {"label": "purple_hexagon"}
    (data / "val.jsonl").write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")

    with pytest.raises(ManifestError, match=r"val\.jsonl:1: unknown label 'purple_hexagon'"):
        train(data, tmp_path / "run", TrainConfig(preset="tiny", stage1_epochs=1), progress=False, log=quiet)


def test_a_non_empty_run_directory_is_refused(tiny_data, tiny_run):
    with pytest.raises(FileExistsError, match="not empty"):
        train(tiny_data, tiny_run, TrainConfig(preset="tiny"), progress=False, log=quiet)
    assert (tiny_run / CHECKPOINT).is_file()


def test_trains_on_a_hateful_memes_layout(tmp_path):
    """train.jsonl / dev.jsonl / an unlabelled test.jsonl, integer ids and 0/1 labels."""
    import random

    from PIL import Image

    (tmp_path / "img").mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(60):
        label = i % 2
        colour = (220, 30, 30) if label else (30, 30, 220)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{i:05d}.png")
        text = (
            rng.choice(["hateful words here", "mean caption"]) if label else rng.choice(["nice words", "kind caption"])
        )
        rows.append({"id": 10000 + i, "img": f"img/{i:05d}.png", "text": text, "label": label})
    for name, part in (("train", rows[:40]), ("dev", rows[40:50])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in ("id", "img", "text")}) + "\n" for r in rows[50:])
    )

    summary = train(tmp_path, tmp_path / "run", TrainConfig(preset="tiny", lambdas=(0.1,)), progress=False, log=quiet)

    assert summary["labels"] == ["0", "1"]
    assert "test" not in summary["evaluation"]  # unlabelled: figures come from the dev split
    assert summary["data"]["sizes"] == {"train": 40, "val": 10}
