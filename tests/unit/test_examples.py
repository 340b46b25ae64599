"""export/examples.py: which test-split pairs ship with a model, and how their files are written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import png_of_size

from export.examples import EXAMPLES_DIR, MAX_IMAGE_BYTES, example_path, media_type, write_examples


def write_manifest(data_dir: Path, split: str, rows: list[dict]) -> None:
    """rows: {id, label, kind?, image?: bytes}; each image is written to img/<id>.png."""
    (data_dir / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        (data_dir / "img" / f"{row['id']}.png").write_bytes(row.get("image", png_of_size(8, 8)))
        line = {"id": row["id"], "img": f"img/{row['id']}.png", "text": f"text of {row['id']}", "label": row["label"]}
        if "kind" in row:
            line["kind"] = row["kind"]
        lines.append(json.dumps(line))
    (data_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_two_per_kind_the_least_shown_labels_first(tmp_path):
    data, staging = tmp_path / "data", tmp_path / "staging"
    staging.mkdir()
    rows = [
        {"id": f"{kind}{i}", "kind": kind, "label": label}
        for kind in ("easy", "hard", "noisy")
        for i, label in enumerate(["cat", "cat", "dog", "owl"])
    ]
    write_manifest(data, "test", rows)

    entries = write_examples(data, staging, log=lambda *_: None)

    assert [e["kind"] for e in entries] == ["easy", "easy", "hard", "hard", "noisy", "noisy"]
    # within a kind, the first sample (file order) among those whose label has been shown least
    assert [e["label"] for e in entries] == ["cat", "dog", "owl", "cat", "dog", "owl"]
    assert [e["id"] for e in entries] == ["easy0", "easy2", "hard3", "hard0", "noisy2", "noisy3"]
    for entry in entries:
        written = (staging / entry["file"]).read_bytes()
        assert entry["file"].startswith(f"{EXAMPLES_DIR}/")
        assert entry["file"].endswith(".png")
        assert written == (data / "img" / f"{entry['id']}.png").read_bytes()
        assert entry["sha256"] == hashlib.sha256(written).hexdigest()
        assert entry["text"] == f"text of {entry['id']}"


def test_a_manifest_without_kinds_gets_a_few(tmp_path):
    data, staging = tmp_path / "data", tmp_path / "staging"
    staging.mkdir()
    write_manifest(data, "test", [{"id": str(i), "label": f"l{i % 3}"} for i in range(10)])

    entries = write_examples(data, staging, log=lambda *_: None)

    assert len(entries) == 6
    assert {e["kind"] for e in entries} == {None}


def test_many_kinds_get_one_each_and_the_val_split_serves_without_a_test_split(tmp_path):
    data, staging = tmp_path / "data", tmp_path / "staging"
    staging.mkdir()
    write_manifest(data, "val", [{"id": f"{k}-{i}", "kind": f"k{k}", "label": "x"} for k in range(9) for i in range(2)])

    entries = write_examples(data, staging, log=lambda *_: None)

    assert [e["kind"] for e in entries] == [f"k{k}" for k in range(9)]


def test_files_that_are_not_images_or_too_big_are_passed_over(tmp_path):
    data, staging = tmp_path / "data", tmp_path / "staging"
    staging.mkdir()
    big = png_of_size(8, 8) + b"\0" * MAX_IMAGE_BYTES
    rows = [
        {"id": "text", "kind": "a", "label": "x", "image": b"not an image at all"},
        {"id": "big", "kind": "a", "label": "x", "image": big},
        {"id": "fine", "kind": "a", "label": "x"},
    ]
    write_manifest(data, "test", rows)

    assert [e["id"] for e in write_examples(data, staging, log=lambda *_: None)] == ["fine"]


def test_no_data_directory_means_no_examples_said_in_the_log(tmp_path):
    messages = []
    assert write_examples(tmp_path / "gone", tmp_path, log=messages.append) == []
    assert write_examples(None, tmp_path, log=messages.append) == []
    (tmp_path / "empty").mkdir()
    assert write_examples(tmp_path / "empty", tmp_path, log=messages.append) == []
    assert len(messages) == 3
    assert all(m.startswith("no examples shipped with the model") for m in messages)
    assert not (tmp_path / EXAMPLES_DIR).exists()


@pytest.mark.parametrize("file", ["../model.json", "examples/../model.json", "/etc/passwd", "examples/missing.png"])
def test_example_path_never_leaves_the_examples_folder(tmp_path, file):
    (tmp_path / EXAMPLES_DIR).mkdir()
    (tmp_path / "model.json").write_text("{}")
    assert example_path(tmp_path, {"file": file}) is None


def test_example_path_and_media_type_of_a_real_entry(tmp_path):
    (tmp_path / EXAMPLES_DIR).mkdir()
    (tmp_path / EXAMPLES_DIR / "00.jpg").write_bytes(b"x")
    path = example_path(tmp_path, {"file": "examples/00.jpg"})
    assert path == (tmp_path / EXAMPLES_DIR / "00.jpg").resolve()
    assert media_type(path) == "image/jpeg"
