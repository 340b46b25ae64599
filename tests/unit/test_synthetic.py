"""Tests for models.data.synthetic: determinism, the realized mix, captions, corruption and atomic writing."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.data.manifest import Sample, load_image_rgb, read_split
from models.data.synthetic import (
    CLEAR_TEMPLATES,
    COLOUR_ONLY_TEMPLATES,
    COLOUR_QUERY_TEMPLATES,
    COLOUR_WORDS,
    COLOURS,
    GENERIC_CAPTIONS,
    KINDS,
    LABELS,
    NOISY_TEMPLATES,
    OOD_COLOUR_WORDS,
    OOD_SHAPE_WORDS,
    POSITION_TEMPLATES,
    SHAPE_ONLY_TEMPLATES,
    SHAPE_QUERY_TEMPLATES,
    SHAPE_WORDS,
    SHAPES,
    VARIANTS,
    OutputExistsError,
    SynthConfig,
    generate,
    render_image,
    variant_of,
    writer,
)
from models.tokenizer import split_words

SMALL = SynthConfig(size=480, seed=3, image_size=32)
SPLIT_SIZES = {"train": 336, "val": 72, "test": 72, "test_ood": 72}  # 480 x (0.7, 0.15, 0.15), test_ood = test
TINY = SynthConfig(size=60, seed=7, image_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, SMALL, progress=False)
    return out


@pytest.fixture(scope="module")
def samples(dataset: Path) -> dict[str, list[Sample]]:
    return {split: read_split(dataset, split) for split in SPLIT_SIZES}


def _all(samples: dict[str, list[Sample]], *kinds: str) -> list[Sample]:
    return [s for split in samples.values() for s in split if s.kind in kinds]


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# The judge of captions, written here by hand from English, not imported from the generator (a caption judged by the
# generator's own word lists passes whatever those lists say): every word that names a class colour or shape, the
# held-out synonyms included. A generator word missing here fails the tests that captions name their class; a word
# filed under the wrong class fails them too.
COLOUR_NAMES = {
    "red": ("red", "crimson", "scarlet", "ruby", "cherry"),
    "green": ("green", "emerald", "lime", "jade", "olive"),
    "blue": ("blue", "navy", "azure", "cobalt", "sapphire"),
}
SHAPE_NAMES = {
    "circle": ("circle", "disc", "ring", "orb", "round"),
    "square": ("square", "box", "block", "tile", "quadrilateral"),
    "triangle": ("triangle", "wedge", "pyramid", "trigon", "delta"),
    "cross": ("cross", "plus sign", "x mark", "saltire", "crosslet"),
}
HELD_OUT_WORDS = {"ruby", "cherry", "jade", "olive", "cobalt", "sapphire", "orb", "round", "tile", "quadrilateral",
                  "trigon", "delta", "saltire", "crosslet"}  # fmt: skip


def _class_words(caption: str) -> tuple[set[str], set[str]]:
    """The colours and shapes a caption names, by the hand-written tables above."""

    def named(words: tuple[str, ...]) -> bool:
        return any(re.search(rf"\b{re.escape(word)}\b", caption) for word in words)

    colours = {colour for colour, words in COLOUR_NAMES.items() if named(words)}
    shapes = {shape for shape, words in SHAPE_NAMES.items() if named(words)}
    return colours, shapes


# Captions written by hand, with what they name: the judge is held to these before it judges the generator.
HAND_CAPTIONS = [
    ("a red circle", {"red"}, {"circle"}),
    ("there is one crimson disc in this picture", {"red"}, {"circle"}),
    ("an emerald x mark", {"green"}, {"cross"}),
    ("a plus sign in navy", {"blue"}, {"cross"}),
    ("one block, lime in colour", {"green"}, {"square"}),
    ("the pyramid in this image is azure", {"blue"}, {"triangle"}),
    ("you are looking at a cobalt trigon", {"blue"}, {"triangle"}),
    ("a faded, grainy jade saltire", {"green"}, {"cross"}),
    ("something scarlet is shown here", {"red"}, set()),
    ("what colour is the ring?", set(), {"circle"}),
    ("the object on the left", set(), set()),
    ("the leftmost shape", set(), set()),
    ("an object on a background", set(), set()),
    ("what is this?", set(), set()),
    ("boxing gloves", set(), set()),  # a class word inside another word names nothing
]


@pytest.mark.parametrize(("caption", "colours", "shapes"), HAND_CAPTIONS)
def test_the_caption_judge_reads_hand_written_captions_right(caption, colours, shapes) -> None:
    assert _class_words(caption) == (colours, shapes)


def test_the_generator_names_each_class_only_with_words_the_judge_files_under_it() -> None:
    for colour, words in (*COLOUR_WORDS.items(), *OOD_COLOUR_WORDS.items()):
        for word in words:
            assert _class_words(word) == ({colour}, set()), (colour, word)
    for shape, words in (*SHAPE_WORDS.items(), *OOD_SHAPE_WORDS.items()):
        for word in words:
            assert _class_words(word) == (set(), {shape}), (shape, word)


def _pixels(sample: Sample) -> np.ndarray:
    return np.asarray(load_image_rgb(sample), dtype=np.int16)


# ---- determinism ----


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", TINY, progress=False)
    generate(tmp_path / "b", TINY, progress=False)
    first, second = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert len(first) == TINY.size + 9 + 5  # every image (test_ood's 9 too), four manifests, synth.json
    assert first == second


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    generate(tmp_path / "a", TINY, progress=False)
    generate(tmp_path / "b", SynthConfig(size=60, seed=8, image_size=32), progress=False)
    first, second = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert first.keys() == second.keys()
    same = [name for name in first if first[name] == second[name]]
    assert same == []


def test_images_do_not_depend_on_generation_order(dataset: Path, samples: dict[str, list[Sample]]) -> None:
    """Each image is a pure function of (seed, index, label, kind), so it can be re-rendered on its own."""
    for sample in samples["test"][:10] + samples["test_ood"][:10]:
        again = render_image(SMALL.seed, int(sample.id), sample.label, sample.kind, SMALL.image_size)
        assert np.array_equal(np.asarray(load_image_rgb(sample)), again)


def test_a_subset_of_splits_is_byte_for_byte_the_whole_data_sets(dataset: Path, tmp_path: Path) -> None:
    """Evaluating a model needs its test splits only: they are the same files as in the whole data set."""
    subset = tmp_path / "subset"
    summary = generate(subset, SMALL, progress=False, splits=("test", "test_ood"))
    assert summary["written_splits"] == ["test", "test_ood"]
    assert sorted(p.name for p in subset.glob("*.jsonl")) == ["test.jsonl", "test_ood.jsonl"]
    for split in ("test", "test_ood"):
        assert (subset / f"{split}.jsonl").read_bytes() == (dataset / f"{split}.jsonl").read_bytes()
    images = sorted(p.name for p in (subset / "img").iterdir())
    assert len(images) == SPLIT_SIZES["test"] + SPLIT_SIZES["test_ood"]
    assert all((subset / "img" / name).read_bytes() == (dataset / "img" / name).read_bytes() for name in images)
    with pytest.raises(ValueError, match=r"splits \['dev'\] are not in"):
        generate(tmp_path / "bad", SMALL, progress=False, splits=("dev",))


# ---- what was generated ----


def test_synth_json_describes_the_output(dataset: Path, samples: dict[str, list[Sample]]) -> None:
    summary = json.loads((dataset / "synth.json").read_text())
    assert summary["config"] == {
        "size": 480,
        "seed": 3,
        "image_size": 32,
        "mix": {"text_sufficient": 0.3, "image_needed": 0.15, "noisy_image": 0.1, "image_decides": 0.25,
                "cross_modal": 0.2},
        "splits": {"train": 0.7, "val": 0.15, "test": 0.15},
        "ood_size": 72,
    }  # fmt: skip
    assert summary["labels"] == list(LABELS) == sorted(LABELS)
    assert len(LABELS) == 12
    assert summary["kinds"] == list(KINDS)
    for split, split_samples in samples.items():
        kinds = Counter(s.kind for s in split_samples)
        assert summary["counts"][split] == {"total": SPLIT_SIZES[split], **{kind: kinds[kind] for kind in KINDS}}


def test_realized_mix_per_split_equals_the_request(samples: dict[str, list[Sample]]) -> None:
    for split, split_samples in samples.items():
        assert len(split_samples) == SPLIT_SIZES[split]
        kinds = Counter(s.kind for s in split_samples)
        for kind, fraction in zip(KINDS, SMALL.mix, strict=True):
            assert abs(kinds[kind] - fraction * SPLIT_SIZES[split]) < 1, (split, kind, kinds)


def test_custom_mix_and_ood_size_are_honoured(tmp_path: Path) -> None:
    config = SynthConfig(size=100, image_size=16, mix=(0.2, 0.2, 0.6, 0.0, 0.0), ood_size=0)
    summary = generate(tmp_path / "d", config, progress=False)
    assert summary["counts"]["train"] == {
        "total": 70, "text_sufficient": 14, "image_needed": 14, "noisy_image": 42, "image_decides": 0, "cross_modal": 0
    }  # fmt: skip
    assert "test_ood" not in summary["counts"]
    assert not (tmp_path / "d" / "test_ood.jsonl").exists()
    kinds = Counter(s.kind for s in read_split(tmp_path / "d", "train"))
    assert kinds == {"text_sufficient": 14, "image_needed": 14, "noisy_image": 42}


def test_labels_are_valid_and_balanced_within_each_kind(samples: dict[str, list[Sample]]) -> None:
    for split_samples in samples.values():
        for kind in KINDS:
            counts = Counter(s.label for s in split_samples if s.kind == kind)
            assert set(counts) <= set(LABELS)
            # round-robin assignment: per-class counts differ by at most one
            per_class = [counts.get(label, 0) for label in LABELS]
            assert max(per_class) - min(per_class) <= 1, (kind, counts)


def test_ids_are_unique_and_name_their_image(dataset: Path, samples: dict[str, list[Sample]]) -> None:
    everything = [s for split in samples.values() for s in split]
    assert sorted(int(s.id) for s in everything) == list(range(SMALL.size + SPLIT_SIZES["test_ood"]))
    assert all(s.image_path == (dataset / "img" / f"{s.id}.png").resolve() for s in everything)
    first_line = (dataset / "train.jsonl").read_text().splitlines()[0]
    assert list(json.loads(first_line)) == ["id", "img", "text", "label", "kind", "variant"]


def test_every_kind_shows_each_of_its_variants(dataset: Path) -> None:
    seen: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for split in SPLIT_SIZES:
        for line in (dataset / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            seen[record["kind"]][record["variant"]] += 1
    for kind, variants in seen.items():
        assert set(variants) == set(VARIANTS[kind]), (kind, variants)


def test_every_image_decodes_at_the_configured_size(samples: dict[str, list[Sample]]) -> None:
    for sample in _all(samples, *KINDS):
        image = load_image_rgb(sample)
        assert (image.mode, image.size) == ("RGB", (32, 32))


# ---- captions ----


def test_caption_tables_keep_class_words_where_they_belong() -> None:
    for template in CLEAR_TEMPLATES + NOISY_TEMPLATES:  # class words may come only from the {c} and {s} slots
        assert _class_words(template.format(c="", s="")) == (set(), set()), template
    for caption in GENERIC_CAPTIONS:
        assert _class_words(caption) == (set(), set()), caption
    for template in COLOUR_ONLY_TEMPLATES + COLOUR_QUERY_TEMPLATES:
        assert _class_words(template.format(c="red"))[1] == set(), template
    for template in SHAPE_ONLY_TEMPLATES + SHAPE_QUERY_TEMPLATES:
        assert _class_words(template.format(s="circle"))[0] == set(), template
    for template in POSITION_TEMPLATES:
        assert _class_words(template.format(at="on the left", most="leftmost")) == (set(), set()), template


def test_clear_captions_name_their_class(samples: dict[str, list[Sample]]) -> None:
    clear = [s for split in ("train", "val", "test") for s in samples[split] if s.kind in ("text_sufficient",
             "noisy_image")]  # fmt: skip
    assert len(clear) == 145 + 48
    for sample in clear:
        colour, shape = sample.label.split("_")
        assert _class_words(sample.text) == ({colour}, {shape}), (sample.label, sample.text)


def test_vague_captions_never_name_the_whole_class(samples: dict[str, list[Sample]]) -> None:
    vague = [s for split in ("train", "val", "test") for s in samples[split] if s.kind == "image_needed"]
    styles = Counter()
    for sample in vague:
        colour, shape = sample.label.split("_")
        named = _class_words(sample.text)
        if sample.text in GENERIC_CAPTIONS:
            assert named == (set(), set()), sample.text
            styles["generic"] += 1
        elif named[0]:
            assert named == ({colour}, set()), (sample.label, sample.text)
            styles["colour only"] += 1
        else:
            assert named == (set(), {shape}), (sample.label, sample.text)
            styles["shape only"] += 1
    # about half generic, a quarter each partial (72 samples: a loose band, the seed is fixed)
    assert len(vague) == 72
    assert 0.3 < styles["generic"] / len(vague) < 0.7, styles
    assert styles["colour only"] >= 8, styles
    assert styles["shape only"] >= 8, styles


def test_image_decides_captions_say_nothing(samples: dict[str, list[Sample]]) -> None:
    decides = [s for split in ("train", "val", "test") for s in samples[split] if s.kind == "image_decides"]
    assert len(decides) == 120
    assert all(s.text in GENERIC_CAPTIONS for s in decides)


def test_cross_modal_captions_point_at_one_object_and_never_name_its_class(samples: dict[str, list[Sample]]) -> None:
    pointing = [s for split in ("train", "val", "test") for s in samples[split] if s.kind == "cross_modal"]
    assert len(pointing) == 95
    for sample in pointing:
        colour, shape = sample.label.split("_")
        named = _class_words(sample.text)
        assert named in ((set(), set()), ({colour}, set()), (set(), {shape})), (sample.label, sample.text)


def test_held_out_captions_use_words_training_never_saw(samples: dict[str, list[Sample]]) -> None:
    training_words = {w for split in ("train", "val", "test") for s in samples[split] for w in split_words(s.text)}
    assert not HELD_OUT_WORDS & training_words
    held_out_seen = {w for s in samples["test_ood"] for w in split_words(s.text)} & HELD_OUT_WORDS
    assert len(held_out_seen) >= 8, held_out_seen  # test_ood does use them
    ood_texts = {s.text for s in samples["test_ood"]}
    assert not ood_texts & {s.text for split in ("train", "val", "test") for s in samples[split]}
    unseen = [s for s in samples["test_ood"] if set(split_words(s.text)) - training_words]
    assert len(unseen) / len(samples["test_ood"]) > 0.5  # most held-out captions carry a word never trained on


# ---- images ----


def _roughness(pixels: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours: ~1 for flat colour, ~1.1 sigma for noise sigma."""
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def _colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels whose channel of ``colour`` stands 80+ above both others (class colours do; backgrounds and the
    grey clutter never)."""
    channel = COLOURS.index(colour)
    others = np.delete(pixels, channel, axis=2).max(axis=2)
    return pixels[:, :, channel] - others > 80


def _dominant_colour(pixels: np.ndarray) -> str:
    return COLOURS[int(np.argmax([_colour_mask(pixels, c).sum() for c in COLOURS]))]


def test_clean_images_are_smooth_and_show_their_colour(samples: dict[str, list[Sample]]) -> None:
    for sample in _all(samples, "text_sufficient", "image_needed"):
        pixels = _pixels(sample)
        assert _roughness(pixels) < 20, sample
        assert _dominant_colour(pixels) == sample.label.split("_")[0], sample


def test_noisy_images_are_heavily_corrupted(samples: dict[str, list[Sample]]) -> None:
    noisy = _all(samples, "noisy_image")
    assert len(noisy) == 48 + 7
    assert min(_roughness(_pixels(s)) for s in noisy) > 40
    # channels are permuted uniformly, so the visible colour matches the label only about a third of the time
    agree = sum(_dominant_colour(_pixels(s)) == s.label.split("_")[0] for s in noisy)
    assert agree / len(noisy) < 0.6, agree


def test_image_decides_pictures_are_one_large_object_or_one_small_object_in_clutter() -> None:
    side = 64
    for index in range(40):
        for label in ("red_circle", "blue_cross"):
            pixels = render_image(5, index, label, "image_decides", side).astype(np.int16)
            colour = label.split("_")[0]
            area = _colour_mask(pixels, colour).mean()
            others = [_colour_mask(pixels, c).mean() for c in COLOURS if c != colour]
            variant = variant_of(5, index, "image_decides")
            assert max(others) < 0.002, (index, label)  # only one class-coloured object, whatever the clutter
            if variant == "easy":
                assert area > 0.08, (index, label, area)
                assert _roughness(pixels) < 20, (index, label)
            else:
                assert 0.003 < area < 0.05, (index, label, area)


def test_cross_modal_pictures_hold_several_objects_of_different_colours() -> None:
    side = 64
    for index in range(40):
        pixels = render_image(5, index, "green_square", "cross_modal", side).astype(np.int16)
        shown = [c for c in COLOURS if _colour_mask(pixels, c).mean() > 0.01]
        assert "green" in shown, (index, shown)
        assert len(shown) >= 2, (index, shown)
        variant = variant_of(5, index, "cross_modal")
        if variant in ("left", "right", "top", "bottom"):  # the target sits at the end of the row the caption names
            axis = 1 if variant in ("left", "right") else 0
            centres = {c: np.nonzero(_colour_mask(pixels, c))[axis].mean() for c in shown}
            target = centres.pop("green")
            expected_first = variant in ("left", "top")
            assert all((target < other) == expected_first for other in centres.values()), (index, variant, centres)


def test_every_shape_renders_in_every_colour() -> None:
    for label in LABELS:
        pixels = render_image(0, 1, label, "text_sufficient", 48).astype(np.int16)
        assert _dominant_colour(pixels) == label.split("_")[0]
    assert {label.split("_")[1] for label in LABELS} == set(SHAPES)


# ---- writing ----


def _failing_after(calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = writer.save_png
    seen = {"calls": 0}

    def save(pixels: np.ndarray, path: Path) -> None:
        seen["calls"] += 1
        if seen["calls"] > calls:
            raise OSError("disk full")
        real_save(pixels, path)

    monkeypatch.setattr(writer, "save_png", save)


def test_failure_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_after(25, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "data", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate(tmp_path / "data", TINY, progress=False)
    before = _file_hashes(tmp_path / "data")
    _failing_after(25, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "data", SynthConfig(size=60, seed=8, image_size=32), progress=False, overwrite=True)
    assert _file_hashes(tmp_path / "data") == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(out, TINY, progress=False)
    with pytest.raises(OutputExistsError, match="not empty.*overwrite=True") as excinfo:
        generate(out, TINY, progress=False)
    assert isinstance(excinfo.value, FileExistsError)
    generate(out, SynthConfig(size=48, seed=8, image_size=32, ood_size=0), progress=False, overwrite=True)
    assert json.loads((out / "synth.json").read_text())["config"]["seed"] == 8
    assert len(list((out / "img").iterdir())) == 48  # the old 60 images are gone, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_empty_existing_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    generate(tmp_path / "data", TINY, progress=False)
    assert (tmp_path / "data" / "synth.json").is_file()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": 10}, "size must be an integer >= 36"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"image_size": 8}, "image_size must be an integer >= 16"),
        ({"mix": (0.5, 0.5, 0.5, 0.0, 0.0)}, "mix fractions .* must sum to 1"),
        ({"mix": (1.2, -0.2, 0.0, 0.0, 0.0)}, "mix fractions must be finite and non-negative"),
        ({"mix": (0.5, 0.35, 0.15)}, "mix needs 5 fractions .*text_sufficient.*cross_modal"),
        ({"splits": (0.7, 0.3)}, "splits needs 3 fractions"),
        ({"size": 40, "splits": (0.99, 0.01, 0.0)}, "leave the val split empty"),
        ({"ood_size": -3}, "ood_size must be a non-negative integer"),
    ],
)
def test_bad_config_says_what_to_fix(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**fields)


def test_config_normalizes_sequences() -> None:
    assert SynthConfig(mix=[0.3, 0.15, 0.1, 0.25, 0.2], splits=[0.7, 0.15, 0.15]) == SynthConfig()
