"""The synthetic image+text benchmark the embedded default model is trained on.

Each sample is one rendered shape (3 colours x 4 shapes = 12 classes, labels like ``red_circle``) with a caption.
Routing only means something if neither modality is always enough, so samples come in three kinds:

- ``text_sufficient``: a clean image and a caption that names colour and shape; the cheap text path is enough.
- ``image_needed``: a clean image and a vague caption (generic, or naming only the colour or only the shape);
  only the image decides.
- ``noisy_image``: a clear caption, but the image is wrecked (channels permuted so colours lie, heavy noise,
  blur and/or an occluding block); an image-only model is unreliable, the text is not.

The output is the manifest format of ``models.data.manifest`` (``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and
``img/``) plus ``synth.json`` describing what was generated. Everything derives from the seed through per-sample
random generators, so the same seed and config give byte-identical files whatever order samples are made in.
No torch here: numpy and Pillow only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from models.staging import staging_dir

GENERATOR_VERSION = 1  # bump when images or captions change, so data sets made by different versions can be told apart

KINDS = ("text_sufficient", "image_needed", "noisy_image")
SPLITS = ("train", "val", "test")
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle", "cross")
LABELS = tuple(sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES))

# Class colours are permutations of one triple, so a noisy image's channel permutation turns one class colour into
# another class colour exactly, and the observed colour carries no information about the true one.
COLOUR_RGB = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
COLOUR_JITTER = 30  # per channel, uniform; keeps the dominant channel >= 100 above the others

# Synonyms a clear caption may use. None of these words appears in any other caption template, so a caption's
# class words can be found by looking for these and nothing else (the tests do).
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "navy", "azure"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ring"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "pyramid"),
    "cross": ("cross", "plus sign", "x mark"),
}

CLEAR_TEMPLATES = (
    "a {c} {s} on a plain background",
    "there is one {c} {s} in this picture",
    "photo of a {s}, coloured {c}",
    "a {c} {s}",
    "this image shows a {c} {s}",
    "the picture contains a single {c} {s}",
    "{c} {s}",
    "a {s} in {c}",
    "here we see a {c} {s} somewhere in the frame",
    "a simple drawing of a {c} {s}",
    "one {s}, {c} in colour",
    "the {s} in this image is {c}",
    "a {c}-coloured {s} against a plain backdrop",
)
# Half the noisy samples say their photo is bad; the other half read like clean ones, so the router cannot learn
# "noisy" from these words alone and has to look at the image glimpse too.
NOISY_TEMPLATES = (
    "blurry photo of a {c} {s}",
    "grainy picture of a {c} {s}",
    "a {c} {s}, hard to make out",
    "a noisy snapshot of a {c} {s}",
    "a badly scanned {c} {s}",
    "a {s} in {c}, the photo is smudged",
)
GENERIC_CAPTIONS = (
    "an object on a background",
    "what is this?",
    "a simple drawing",
    "look at this picture",
    "guess what this is",
    "an image",
    "something is shown here",
    "a picture of a single object",
    "can you tell what this is?",
    "an object somewhere in the frame",
    "a plain picture",
    "one thing on a backdrop",
)
COLOUR_ONLY_TEMPLATES = (
    "something {c} is shown here",
    "a {c} object",
    "the object is {c}",
    "an item in {c}",
    "mostly {c}",
    "a {c} thing on a background",
)
SHAPE_ONLY_TEMPLATES = (
    "a {s} of some colour",
    "there is a {s} here",
    "a {s} on a background",
    "the picture shows a {s}",
    "one {s}, colour not given",
)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: box filtering a mask is exact area coverage
_CROSS_HALF_WIDTH = 0.25  # arm half-width as a fraction of arm length
_ARTICLE = re.compile(r"\ba (?=[aeiou]|x\b)")  # "a emerald disc" -> "an emerald disc", "a x mark" -> "an x mark"

# Independent random streams: the plan (kinds and labels per split), each sample's image, each sample's caption.
# Separate streams keep images unchanged when only caption templates change, and vice versa.
_PLAN_STREAM, _IMAGE_STREAM, _CAPTION_STREAM = 0, 1, 2


@dataclass(frozen=True)
class SynthConfig:
    size: int = 8000  # samples over all splits
    seed: int = 0  # non-negative; everything generated derives from it
    image_size: int = 64  # images are image_size x image_size RGB
    mix: tuple[float, float, float] = (0.5, 0.35, 0.15)  # fractions of text_sufficient, image_needed, noisy_image
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)  # fractions of train, val, test

    def __post_init__(self) -> None:
        # Stored as float tuples so that a config built from lists or ints compares, hashes and serializes the same.
        object.__setattr__(self, "mix", _fractions("mix", self.mix, KINDS))
        object.__setattr__(self, "splits", _fractions("splits", self.splits, SPLITS))
        minimum = len(LABELS) * len(SPLITS)
        if not _is_int(self.size) or self.size < minimum:
            raise ValueError(f"size must be an integer >= {minimum} (12 classes x 3 splits), got {self.size!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.image_size) or self.image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16 (shapes blur away below), got {self.image_size!r}")
        for split, count in zip(SPLITS, _apportion(self.size, self.splits), strict=True):
            if count == 0:
                raise ValueError(
                    f"splits {self.splits} leave the {split} split empty at size {self.size}; "
                    "give every split a larger fraction or raise size"
                )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fractions(name: str, values: Sequence[float], names: Sequence[str]) -> tuple[float, ...]:
    try:
        fractions = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {len(names)} numbers ({', '.join(names)}), got {values!r}") from None
    if len(fractions) != len(names):
        raise ValueError(f"{name} needs {len(names)} fractions ({', '.join(names)}), got {len(fractions)}: {values!r}")
    if any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"{name} fractions must be finite and non-negative, got {values!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"{name} fractions ({', '.join(names)}) must sum to 1, got {values!r} (sum {sum(fractions):.6g}); "
            "scale them so they do"
        )
    return fractions


def _apportion(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, as close to ``total * fraction`` as possible (largest remainder)."""
    scale = sum(fractions)
    exact = [total * f / scale for f in fractions]
    counts = [math.floor(x) for x in exact]
    # Ties go to the earlier entry, so the result depends only on the inputs.
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class _Planned:
    index: int  # global sample index; the id and the image file name derive from it
    split: str
    kind: str
    label: str


def _plan(config: SynthConfig) -> list[_Planned]:
    """Which split, kind and label each index gets.

    Kinds are assigned by exact counts (so each split's realized mix is the requested one up to rounding) and labels
    round-robin within each kind from a random starting class (so classes are balanced within every kind and split),
    then the split is shuffled.
    """
    split_sizes = _apportion(config.size, config.splits)
    planned: list[_Planned] = []
    start = 0
    for split_number, (split, split_size) in enumerate(zip(SPLITS, split_sizes, strict=True)):
        rng = np.random.default_rng([config.seed, _PLAN_STREAM, split_number])
        kinds_and_labels: list[tuple[str, str]] = []
        for kind, count in zip(KINDS, _apportion(split_size, config.mix), strict=True):
            first = int(rng.integers(len(LABELS)))
            kinds_and_labels += [(kind, LABELS[(first + j) % len(LABELS)]) for j in range(count)]
        for offset, position in enumerate(rng.permutation(split_size)):
            kind, label = kinds_and_labels[position]
            planned.append(_Planned(index=start + offset, split=split, kind=kind, label=label))
        start += split_size
    return planned


# ---- images ----


@lru_cache(maxsize=4)
def _unit_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [-0.5, 0.5], for background gradients."""
    ys, xs = np.mgrid[0:side, 0:side] / (side - 1) - 0.5
    return xs, ys


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Low-saturation, mid-to-light background with a mild linear gradient, (side, side, 3) float."""
    grey = rng.uniform(110, 220)
    tint = rng.uniform(-12, 12, size=3)  # small per-channel offsets: a hint of colour, never a class colour
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0, 30)
    xs, ys = _unit_grid(side)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) * strength  # (side, side)
    return grey + tint[None, None, :] + ramp[:, :, None]


def _outline(shape: str, radius: float, angle: float) -> np.ndarray:
    """Polygon vertices around (0, 0), (N, 2), every vertex at most ``radius`` from the centre."""
    if shape == "square":
        corners = angle + math.pi / 4 + np.arange(4) * math.pi / 2
        return radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)
    if shape == "triangle":
        corners = angle + np.arange(3) * 2 * math.pi / 3
        return radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)
    if shape == "cross":
        arm = radius / math.hypot(1.0, _CROSS_HALF_WIDTH)  # the arm's outer corners lie on the circle
        half = arm * _CROSS_HALF_WIDTH
        points = np.array(
            [(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
             (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half)]
        )  # fmt: skip
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        return points @ rotation.T
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# Rotations beyond these repeat the shape (square and cross have 4-fold symmetry, the triangle 3-fold).
_ROTATION_PERIOD = {"square": math.pi / 2, "triangle": 2 * math.pi / 3, "cross": math.pi / 2}


def _shape_mask(rng: np.random.Generator, shape: str, side: int) -> tuple[np.ndarray, tuple[float, float], float]:
    """Anti-aliased coverage mask (side, side) in [0, 1], the shape's centre and its bounding-circle diameter."""
    diameter = rng.uniform(0.3, 0.7) * side
    radius = diameter / 2
    # The whole bounding circle stays inside the image, with a pixel to spare.
    centre_x, centre_y = rng.uniform(radius + 1, side - radius - 1, size=2)
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (side * scale, side * scale), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        left, top = (centre_x - radius) * scale, (centre_y - radius) * scale
        draw.ellipse([left, top, left + diameter * scale, top + diameter * scale], fill=255)
    else:
        vertices = _outline(shape, radius, rng.uniform(0, _ROTATION_PERIOD[shape]))
        vertices = (vertices + (centre_x, centre_y)) * scale
        draw.polygon([tuple(v) for v in vertices.tolist()], fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0, (centre_x, centre_y), diameter


def _clean_render(rng: np.random.Generator, label: str, side: int) -> tuple[np.ndarray, tuple[float, float], float]:
    """The shape on its background, (side, side, 3) float, before any noise."""
    colour, shape = label.split("_")
    background = _background(rng, side)
    mask, centre, diameter = _shape_mask(rng, shape, side)
    fill = np.asarray(COLOUR_RGB[colour], dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    coverage = mask[:, :, None]
    return background * (1.0 - coverage) + fill * coverage, centre, diameter


def _corrupt(rng: np.random.Generator, pixels: np.ndarray, centre: tuple[float, float], diameter: float) -> np.ndarray:
    """Make the image unreliable: colours lie, and blur and/or a block hide the shape under heavy noise."""
    side = pixels.shape[0]
    pixels = pixels[:, :, rng.permutation(3)]  # uniform over all 6 orders: the seen colour says nothing of the true
    style = int(rng.integers(3))  # 0: blur, 1: occlusion, 2: both
    if style in (0, 2):
        blurred = Image.fromarray(_to_uint8(pixels)).filter(ImageFilter.GaussianBlur(rng.uniform(0.06, 0.1) * side))
        pixels = np.asarray(blurred, dtype=np.float64)
    if style in (1, 2):
        pixels = _occlude(rng, pixels, centre, diameter)
    return pixels + rng.normal(0.0, rng.uniform(60, 90), size=pixels.shape)


def _occlude(rng: np.random.Generator, pixels: np.ndarray, centre: tuple[float, float], diameter: float) -> np.ndarray:
    """Paint a random-coloured block over most of the shape."""
    side = pixels.shape[0]
    width, height = rng.uniform(0.8, 1.1, size=2) * diameter
    shift_x, shift_y = rng.uniform(-0.15, 0.15, size=2) * diameter
    left = max(0, round(centre[0] + shift_x - width / 2))
    top = max(0, round(centre[1] + shift_y - height / 2))
    right = min(side, round(centre[0] + shift_x + width / 2))
    bottom = min(side, round(centre[1] + shift_y + height / 2))
    occluded = pixels.copy()
    occluded[top:bottom, left:right] = rng.uniform(0, 255, size=3)
    return occluded


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_image(seed: int, index: int, label: str, kind: str, side: int) -> np.ndarray:
    """Sample ``index``'s image, (side, side, 3) uint8; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, index])
    pixels, centre, diameter = _clean_render(rng, label, side)
    if kind == "noisy_image":
        pixels = _corrupt(rng, pixels, centre, diameter)
    else:
        pixels = pixels + rng.normal(0.0, rng.uniform(4, 8), size=pixels.shape)  # mild sensor noise
    return _to_uint8(pixels)


# ---- captions ----


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_caption(seed: int, index: int, label: str, kind: str) -> str:
    """Sample ``index``'s caption; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _CAPTION_STREAM, index])
    colour, shape = label.split("_")
    colour_word = _pick(rng, COLOUR_WORDS[colour])
    shape_word = _pick(rng, SHAPE_WORDS[shape])
    if kind == "text_sufficient":
        template = _pick(rng, CLEAR_TEMPLATES)
    elif kind == "noisy_image":
        template = _pick(rng, NOISY_TEMPLATES if rng.random() < 0.5 else CLEAR_TEMPLATES)
    elif kind == "image_needed":
        vagueness = rng.random()  # half generic, a quarter colour only, a quarter shape only
        if vagueness < 0.5:
            template = _pick(rng, GENERIC_CAPTIONS)
        elif vagueness < 0.75:
            template = _pick(rng, COLOUR_ONLY_TEMPLATES)
        else:
            template = _pick(rng, SHAPE_ONLY_TEMPLATES)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return _ARTICLE.sub("an ", template.format(c=colour_word, s=shape_word))


# ---- writing ----


class OutputExistsError(FileExistsError):
    """The output directory already holds files and overwriting was not asked for."""


def generate(
    out_dir: Path,
    config: SynthConfig = SynthConfig(),  # noqa: B008 (frozen, so one shared default is safe)
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the benchmark to ``out_dir`` and return the content of its ``synth.json``.

    Files are written to a sibling staging directory that is renamed into place at the end; on any failure it is
    removed, so ``out_dir`` is either complete or untouched. An existing non-empty ``out_dir`` raises
    ``OutputExistsError`` unless ``overwrite`` is set.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite=overwrite)
    staging = staging_dir(out_dir)
    try:
        summary = _write_dataset(staging, config, progress=progress)
        _move_into_place(staging, out_dir, overwrite=overwrite)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _check_target(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory; choose another output path")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise OutputExistsError(
            f"{out_dir} already exists and is not empty; remove it, choose another output directory, "
            "or pass overwrite=True"
        )


def _move_into_place(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    _check_target(out_dir, overwrite=overwrite)  # again: something may have written there while we generated
    # Move the old directory aside first, so there is never a moment without a complete out_dir or a way back.
    retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    # Pillow's PNG writer stores no timestamp, so equal pixels give equal bytes (for a given zlib).
    Image.fromarray(pixels).save(path, format="PNG")


def _write_dataset(root: Path, config: SynthConfig, *, progress: bool) -> dict:
    plan = _plan(config)
    (root / "img").mkdir()
    id_width = max(6, len(str(config.size - 1)))
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for item in tqdm(plan, desc="synthetic samples", unit="img", disable=not progress):
        sample_id = f"{item.index:0{id_width}d}"
        image_file = f"img/{sample_id}.png"
        _save_png(render_image(config.seed, item.index, item.label, item.kind, config.image_size), root / image_file)
        record = {  # fixed key order: part of byte-identical output
            "id": sample_id,
            "img": image_file,
            "text": make_caption(config.seed, item.index, item.label, item.kind),
            "label": item.label,
            "kind": item.kind,
        }
        lines[item.split].append(json.dumps(record))
    for split, split_lines in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(split_lines) + "\n", encoding="utf-8", newline="\n")
    summary = _summary(config, plan)
    (root / "synth.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8", newline="\n")
    return summary


def _summary(config: SynthConfig, plan: Sequence[_Planned]) -> dict:
    counts = {split: {"total": 0, **dict.fromkeys(KINDS, 0)} for split in SPLITS}
    for item in plan:
        counts[item.split]["total"] += 1
        counts[item.split][item.kind] += 1
    return {
        "generator": "dynfuse synthetic benchmark",
        "generator_version": GENERATOR_VERSION,
        "config": {
            "size": config.size,
            "seed": config.seed,
            "image_size": config.image_size,
            "mix": dict(zip(KINDS, config.mix, strict=True)),
            "splits": dict(zip(SPLITS, config.splits, strict=True)),
        },
        "labels": list(LABELS),
        "kinds": list(KINDS),
        "counts": counts,
    }
