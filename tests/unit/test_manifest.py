"""Tests for models.data.manifest: Hateful Memes' layout, generated data, and every error naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from models.data.manifest import (
    ManifestError,
    Sample,
    check_labels,
    find_split_file,
    label_names,
    load_image_rgb,
    read_manifest,
    read_split,
)
from models.data.synthetic import LABELS, SynthConfig, generate


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_png(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 6), colour: object = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format="PNG")
    return path


def _line(**fields: object) -> str:
    return json.dumps(fields)


# ---- Hateful Memes' layout ----


@pytest.fixture
def memes_dir(tmp_path: Path) -> Path:
    """A miniature of Hateful Memes as released: int ids, int 0/1 labels, dev.jsonl, an unlabelled test.jsonl."""
    for sample_id in (42953, 23058, 13894, 37408):
        _write_png(tmp_path / "img" / f"{sample_id}.png")
    _write_lines(
        tmp_path / "train.jsonl",
        [
            _line(id=42953, img="img/42953.png", label=0, text="its their character not their color that matters"),
            _line(id=23058, img="img/23058.png", label=1, text="don't be afraid to love again"),
        ],
    )
    _write_lines(tmp_path / "dev.jsonl", [_line(id=13894, img="img/13894.png", label=1, text="putting bows on pets")])
    _write_lines(tmp_path / "test.jsonl", [_line(id=37408, img="img/37408.png", text="a caption without a label")])
    return tmp_path


def test_hateful_memes_train_split_reads_with_string_ids_and_labels(memes_dir: Path) -> None:
    train = read_split(memes_dir, "train")
    assert [s.id for s in train] == ["42953", "23058"]
    assert [s.label for s in train] == ["0", "1"]
    assert train[0].text == "its their character not their color that matters"
    assert train[0].image_path == (memes_dir / "img" / "42953.png").resolve()
    assert train[0].image_path.is_absolute()
    assert train[0].kind is None
    assert train[1].source == f"{memes_dir / 'train.jsonl'}:2"
    assert label_names(train) == ["0", "1"]


def test_val_resolves_to_dev_jsonl(memes_dir: Path) -> None:
    assert find_split_file(memes_dir, "val") == memes_dir / "dev.jsonl"
    val = read_split(memes_dir, "val")
    assert [(s.id, s.label) for s in val] == [("13894", "1")]
    check_labels(val, label_names(read_split(memes_dir, "train")))  # raises if "1" were unknown


def test_unlabelled_test_split_needs_require_label_false(memes_dir: Path) -> None:
    with pytest.raises(ManifestError) as excinfo:
        read_split(memes_dir, "test")
    assert str(excinfo.value).startswith(f"{memes_dir / 'test.jsonl'}:1: missing field 'label'")
    test = read_split(memes_dir, "test", require_label=False)
    assert [(s.id, s.label) for s in test] == [("37408", None)]
    assert label_names(test) == []


def test_val_jsonl_wins_over_dev_jsonl(memes_dir: Path) -> None:
    _write_lines(memes_dir / "val.jsonl", [_line(id=1, img="img/13894.png", label=0, text="t")])
    assert find_split_file(memes_dir, "val") == memes_dir / "val.jsonl"
    assert find_split_file(memes_dir, "test") == memes_dir / "test.jsonl"


def test_unknown_split_name_is_looked_for_as_is(memes_dir: Path) -> None:
    (memes_dir / "dev.jsonl").rename(memes_dir / "dev_unseen.jsonl")
    assert find_split_file(memes_dir, "dev_unseen") == memes_dir / "dev_unseen.jsonl"


def test_missing_split_lists_every_name_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as excinfo:
        find_split_file(tmp_path, "val")
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path}: no manifest for split 'val'")
    assert "val.jsonl, dev.jsonl, dev_seen.jsonl, validation.jsonl" in message


def test_missing_data_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="data directory not found"):
        find_split_file(tmp_path / "nowhere", "train")


# ---- generated data ----


def test_generated_benchmark_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    summary = generate(out, SynthConfig(size=60, seed=1, image_size=32), progress=False)
    train = read_split(out, "train")
    assert len(train) == summary["counts"]["train"]["total"] == 42
    assert label_names(train) == list(LABELS)  # labels are balanced, so 42 samples cover all 12 classes
    for split in ("train", "val", "test"):
        samples = read_split(out, split)
        check_labels(samples, label_names(train))
        kinds = [s.kind for s in samples]
        assert {kind: kinds.count(kind) for kind in summary["kinds"]} == {
            kind: summary["counts"][split][kind] for kind in summary["kinds"]
        }
        assert all(s.image_path.parent == (out / "img").resolve() for s in samples)
        assert all(s.image_path.stem == s.id for s in samples)
        assert load_image_rgb(samples[0]).size == (32, 32)


# ---- line-level errors ----

GOOD = _line(id=1, img="img/a.png", text="hello", label="cat")

BAD_LINES = {
    "invalid json": ('{"id": 2, "img": ', "invalid JSON (Expecting value at column 18)"),
    "not an object": ("[1, 2]", "expected a JSON object, got a list"),
    "missing id": (_line(img="img/a.png", text="t", label="cat"), "missing field 'id'"),
    "missing img": (_line(id=2, text="t", label="cat"), "missing field 'img'"),
    "missing text": (_line(id=2, img="img/a.png", label="cat"), "missing field 'text'"),
    "missing label": (_line(id=2, img="img/a.png", text="t"), "missing field 'label'"),
    "null label": (_line(id=2, img="img/a.png", text="t", label=None), "field 'label' is null"),
    "text not a string": (_line(id=2, img="img/a.png", text=5, label="cat"), "field 'text' must be a string"),
    "null text": (_line(id=2, img="img/a.png", text=None, label="cat"), "field 'text' must be a string, got null"),
    "img not a string": (_line(id=2, img=5, text="t", label="cat"), "field 'img' must be a non-empty string"),
    "id not a scalar": (_line(id=[2], img="img/a.png", text="t", label="cat"), "field 'id' must be a string or"),
    "boolean label": (_line(id=2, img="img/a.png", text="t", label=True), "field 'label' must be a string or"),
    "kind not a string": (_line(id=2, img="img/a.png", text="t", label="cat", kind=3), "field 'kind' must be"),
    "missing image": (_line(id=2, img="img/missing.png", text="t", label="cat"), "image file not found"),
    "duplicate id": (_line(id="1", img="img/a.png", text="t", label="cat"), "duplicate id '1' (first seen on line 1)"),
}


@pytest.mark.parametrize(("bad_line", "expected"), list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_line_is_reported_with_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    _write_png(tmp_path / "img" / "a.png")
    manifest = _write_lines(tmp_path / "train.jsonl", [GOOD, "", bad_line, GOOD.replace('"id": 1', '"id": 9')])
    with pytest.raises(ManifestError) as excinfo:
        read_manifest(manifest)
    message = str(excinfo.value)
    assert message.startswith(f"{manifest}:3: "), message  # the blank line 2 still counts
    assert expected in message


def test_invalid_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    _write_png(tmp_path / "img" / "a.png")
    manifest = tmp_path / "train.jsonl"
    manifest.write_bytes(GOOD.encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(ManifestError, match=r"train\.jsonl:2: not valid UTF-8"):
        read_manifest(manifest)


def test_empty_manifest_is_a_file_level_error(tmp_path: Path) -> None:
    manifest = _write_lines(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(ManifestError) as excinfo:
        read_manifest(manifest)
    assert str(excinfo.value).startswith(f"{manifest}: manifest is empty")


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"train\.jsonl: manifest file not found"):
        read_manifest(tmp_path / "train.jsonl")


def test_optional_fields_and_leniencies(tmp_path: Path) -> None:
    """Extra fields are ignored, kind is kept, text may be empty, a BOM is tolerated, images may be absent."""
    manifest = tmp_path / "train.jsonl"
    lines = [
        _line(id="a", img="img/nowhere.png", text="", label=3, kind="image_needed", extra={"x": 1}),
        _line(id="b", img="../elsewhere/b.png", text="t", label="cat"),
    ]
    manifest.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    first, second = read_manifest(manifest, check_images=False)
    assert (first.id, first.text, first.label, first.kind) == ("a", "", "3", "image_needed")
    assert second.image_path == (tmp_path.parent / "elsewhere" / "b.png").resolve()
    with pytest.raises(ManifestError, match=r"train\.jsonl:1: image file not found"):
        read_manifest(manifest)


# ---- labels ----


def _sample(label: str | None, source: str = "m.jsonl:1") -> Sample:
    return Sample(id="1", image_path=Path("/x.png"), text="", label=label, kind=None, source=source)


def test_label_names_sorts_numeric_labels_numerically() -> None:
    samples = [_sample(label) for label in ("10", "cat", "2", "1", "2", None, "-1", "ant")]
    assert label_names(samples) == ["-1", "1", "2", "10", "ant", "cat"]


def test_check_labels_names_the_line_of_an_unknown_label(tmp_path: Path) -> None:
    _write_png(tmp_path / "img" / "a.png")
    val = _write_lines(tmp_path / "val.jsonl", [GOOD, _line(id=2, img="img/a.png", text="t", label="dog")])
    with pytest.raises(ManifestError) as excinfo:
        check_labels(read_manifest(val), ["cat", "cow"])
    message = str(excinfo.value)
    assert message.startswith(f"{val}:2: unknown label 'dog'")
    assert "the training split has: cat, cow" in message


def test_check_labels_passes_known_and_missing_labels() -> None:
    assert check_labels([_sample("cat"), _sample(None)], ["cat"]) is None


# ---- images ----


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [("RGB", (10, 20, 30), (10, 20, 30)), ("L", 77, (77, 77, 77)), ("RGBA", (1, 2, 3, 255), (1, 2, 3))],
)
def test_load_image_rgb_converts_to_rgb(tmp_path: Path, mode: str, colour: object, expected: tuple) -> None:
    path = _write_png(tmp_path / "img.png", mode=mode, colour=colour)
    image = load_image_rgb(Sample(id="1", image_path=path, text="", label="cat", kind=None, source="m.jsonl:1"))
    assert (image.mode, image.size) == ("RGB", (8, 6))
    assert image.getpixel((3, 2)) == expected


def _image_sample(tmp_path: Path, write: object) -> tuple[Path, Sample]:
    """A two-line manifest whose second line points at an image written by ``write(path)``."""
    _write_png(tmp_path / "img" / "a.png")
    bad = tmp_path / "img" / "b.png"
    write(bad)
    manifest = _write_lines(tmp_path / "train.jsonl", [GOOD, _line(id=2, img="img/b.png", text="t", label="cat")])
    return manifest, read_manifest(manifest)[1]


def _truncate_png(path: Path) -> None:
    big = Image.effect_noise((64, 64), 50).convert("RGB")
    big.save(path, format="PNG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "write",
    [lambda p: p.write_bytes(b"this is not a png at all" * 10), _truncate_png],
    ids=["garbage", "truncated"],
)
def test_unreadable_image_names_manifest_line_and_file(tmp_path: Path, write: object) -> None:
    manifest, sample = _image_sample(tmp_path, write)
    with pytest.raises(ManifestError) as excinfo:
        load_image_rgb(sample)
    message = str(excinfo.value)
    assert message.startswith(f"{manifest}:2: image {sample.image_path} cannot be read: ")


def test_image_deleted_after_reading_is_reported(tmp_path: Path) -> None:
    manifest, sample = _image_sample(tmp_path, lambda p: _write_png(p))
    sample.image_path.unlink()
    with pytest.raises(ManifestError, match=r"train\.jsonl:2: image .*b\.png cannot be read: FileNotFoundError"):
        load_image_rgb(sample)
