"""Images of the synthetic benchmark: coloured shapes on plain backgrounds, alone, among clutter or in groups.

Every picture is a pure function of (seed, sample index, label, kind): its own random stream decides the
geometry, and ``variant_of`` (a stream of its own, shared with the captions) decides what kind of scene it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.data.synthetic.config import COLOURS, SHAPES

# Class colours are permutations of one triple, so a noisy image's channel permutation turns one class colour into
# another class colour exactly, and the observed colour carries no information about the true one.
COLOUR_RGB = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
COLOUR_JITTER = 30  # per channel, uniform; keeps the dominant channel >= 100 above the others

# What each kind's scenes vary in (drawn by ``variant_of``):
#   image_decides: "easy" (one large clean object: a low-resolution look is enough) or "hard" (one small object
#                  among grey clutter: only the full-resolution encoder finds it);
#   cross_modal:   which object the caption points at, by position ("left", "right", "top", "bottom") or by the
#                  attribute it names ("colour": the caption gives the colour, the image the shape; "shape": the
#                  other way round).
VARIANTS = {
    "text_sufficient": ("single",),
    "image_needed": ("single",),
    "noisy_image": ("corrupted",),
    "image_decides": ("easy", "hard"),
    "cross_modal": ("left", "right", "top", "bottom", "colour", "shape"),
}
# Position questions are what pooled (late) fusion cannot answer, attribute questions what it can: the weights
# keep both in the kind, position questions the more common.
_CROSS_MODAL_WEIGHTS = (0.2, 0.2, 0.15, 0.15, 0.15, 0.15)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: box filtering a mask is exact area coverage
_CROSS_HALF_WIDTH = 0.25  # arm half-width as a fraction of arm length
# Rotations beyond these repeat the shape (square and cross have 4-fold symmetry, the triangle 3-fold).
_ROTATION_PERIOD = {"circle": 1.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3, "cross": math.pi / 2}

# Independent random streams: the plan (kinds and labels per split), each sample's image, each sample's caption and
# each sample's scene variant. Separate streams keep images unchanged when only caption templates change.
PLAN_STREAM, IMAGE_STREAM, CAPTION_STREAM, VARIANT_STREAM = 0, 1, 2, 3


def variant_of(seed: int, index: int, kind: str) -> str:
    """The scene variant of sample ``index`` (see ``VARIANTS``); images and captions both read it."""
    options = VARIANTS[kind]
    if len(options) == 1:
        return options[0]
    rng = np.random.default_rng([seed, VARIANT_STREAM, index])
    weights = _CROSS_MODAL_WEIGHTS if kind == "cross_modal" else None
    return options[int(rng.choice(len(options), p=weights))]


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    centre: tuple[float, float]  # pixels
    diameter: float  # of the bounding circle, pixels
    angle: float  # radians


# ---- drawing ----


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


def _mask(shape: Shape, side: int) -> np.ndarray:
    """Anti-aliased coverage of one shape, (side, side) in [0, 1]."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (side * scale, side * scale), 0)
    draw = ImageDraw.Draw(canvas)
    centre_x, centre_y = shape.centre
    radius = shape.diameter / 2
    if shape.shape == "circle":
        left, top = (centre_x - radius) * scale, (centre_y - radius) * scale
        draw.ellipse([left, top, left + shape.diameter * scale, top + shape.diameter * scale], fill=255)
    else:
        vertices = (_outline(shape.shape, radius, shape.angle) + (centre_x, centre_y)) * scale
        draw.polygon([tuple(v) for v in vertices.tolist()], fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _paint(pixels: np.ndarray, coverage: np.ndarray, fill: np.ndarray) -> np.ndarray:
    coverage = coverage[:, :, None]
    return pixels * (1.0 - coverage) + fill * coverage


def _class_fill(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.asarray(COLOUR_RGB[colour], dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)


def _grey_fill(rng: np.random.Generator) -> np.ndarray:
    """A clutter colour: grey with a faint tint, never within reach of a class colour."""
    return rng.uniform(50, 210) + rng.uniform(-12, 12, size=3)


def _placed(rng: np.random.Generator, colour: str, shape: str, diameter: float, side: int) -> Shape:
    """A shape of ``diameter`` anywhere its bounding circle fits, with a pixel to spare."""
    radius = diameter / 2
    centre = tuple(rng.uniform(radius + 1, side - radius - 1, size=2))
    return Shape(colour, shape, centre, diameter, rng.uniform(0, _ROTATION_PERIOD[shape]))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _sensor_noise(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    return pixels + rng.normal(0.0, rng.uniform(4, 8), size=pixels.shape)


# ---- scenes ----


def _single(
    rng: np.random.Generator, label: str, side: int, size_range: tuple[float, float]
) -> tuple[np.ndarray, Shape]:
    colour, shape = label.split("_")
    pixels = _background(rng, side)
    target = _placed(rng, colour, shape, rng.uniform(*size_range) * side, side)
    return _paint(pixels, _mask(target, side), _class_fill(rng, colour)), target


def _cluttered(rng: np.random.Generator, label: str, side: int) -> np.ndarray:
    """A small class object drawn last, over grey shapes and strokes that hide it from a coarse look."""
    colour, shape = label.split("_")
    pixels = _background(rng, side)
    for _ in range(int(rng.integers(3, 7))):
        distractor = _placed(rng, "grey", SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(0.12, 0.3) * side, side)
        pixels = _paint(pixels, _mask(distractor, side), _grey_fill(rng))
    pixels = _strokes(rng, pixels, int(rng.integers(2, 5)))
    target = _placed(rng, colour, shape, rng.uniform(0.16, 0.24) * side, side)
    return _paint(pixels, _mask(target, side), _class_fill(rng, colour))


def _strokes(rng: np.random.Generator, pixels: np.ndarray, count: int) -> np.ndarray:
    side = pixels.shape[0]
    scale = _SUPERSAMPLE
    for _ in range(count):
        canvas = Image.new("L", (side * scale, side * scale), 0)
        ends = rng.uniform(0, side * scale, size=4)
        ImageDraw.Draw(canvas).line(ends.tolist(), fill=255, width=max(1, round(side / 40 * scale)))
        coverage = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float64) / 255.0
        pixels = _paint(pixels, coverage, _grey_fill(rng))
    return pixels


def _group(rng: np.random.Generator, label: str, variant: str, side: int) -> np.ndarray:
    """Two or three objects of different colours and shapes in a row or a column; ``label`` is the one the
    caption points at, placed at the end of the row the caption names."""
    colour, shape = label.split("_")
    count = int(rng.integers(2, 4))
    others_colours = rng.permutation([c for c in COLOURS if c != colour])[: count - 1]
    others_shapes = rng.permutation([s for s in SHAPES if s != shape])[: count - 1]
    objects = [(colour, shape)] + list(zip(others_colours.tolist(), others_shapes.tolist(), strict=True))
    axis = {"left": 0, "right": 0, "top": 1, "bottom": 1}.get(variant, int(rng.integers(2)))  # 0: x, 1: y
    slots = rng.permutation(count).tolist()  # object i goes to slot slots[i] along the axis
    end = {"left": 0, "top": 0, "right": count - 1, "bottom": count - 1}.get(variant)
    if end is not None:  # the target (object 0) swaps into the end of the row the caption names
        slots[slots.index(end)] = slots[0]
        slots[0] = end
    # Slots are equal strips along the axis; an object's jitter keeps it inside its strip, so neighbours never
    # touch and "leftmost" is never a close call.
    strip = side / count
    pixels = _background(rng, side)
    for (obj_colour, obj_shape), slot in zip(objects, slots, strict=True):
        diameter = rng.uniform(0.22, 0.30) * side
        radius = diameter / 2
        jitter = max(0.0, (strip - diameter) / 2 - 1)
        along = float(np.clip((slot + 0.5) * strip + rng.uniform(-jitter, jitter), radius + 1, side - radius - 1))
        across = float(rng.uniform(radius + 1, side - radius - 1))
        centre = (along, across) if axis == 0 else (across, along)
        item = Shape(obj_colour, obj_shape, centre, diameter, rng.uniform(0, _ROTATION_PERIOD[obj_shape]))
        pixels = _paint(pixels, _mask(item, side), _class_fill(rng, obj_colour))
    return pixels


def _corrupt(rng: np.random.Generator, pixels: np.ndarray, target: Shape) -> np.ndarray:
    """Make the image unreliable: colours lie, and blur and/or a block hide the shape under heavy noise."""
    side = pixels.shape[0]
    pixels = pixels[:, :, rng.permutation(3)]  # uniform over all 6 orders: the seen colour says nothing of the true
    style = int(rng.integers(3))  # 0: blur, 1: occlusion, 2: both
    if style in (0, 2):
        blurred = Image.fromarray(_to_uint8(pixels)).filter(ImageFilter.GaussianBlur(rng.uniform(0.06, 0.1) * side))
        pixels = np.asarray(blurred, dtype=np.float64)
    if style in (1, 2):
        pixels = _occlude(rng, pixels, target)
    return pixels + rng.normal(0.0, rng.uniform(60, 90), size=pixels.shape)


def _occlude(rng: np.random.Generator, pixels: np.ndarray, target: Shape) -> np.ndarray:
    """Paint a random-coloured block over most of the shape."""
    side = pixels.shape[0]
    width, height = rng.uniform(0.8, 1.1, size=2) * target.diameter
    shift_x, shift_y = rng.uniform(-0.15, 0.15, size=2) * target.diameter
    left = max(0, round(target.centre[0] + shift_x - width / 2))
    top = max(0, round(target.centre[1] + shift_y - height / 2))
    right = min(side, round(target.centre[0] + shift_x + width / 2))
    bottom = min(side, round(target.centre[1] + shift_y + height / 2))
    occluded = pixels.copy()
    occluded[top:bottom, left:right] = rng.uniform(0, 255, size=3)
    return occluded


def render_image(seed: int, index: int, label: str, kind: str, side: int) -> np.ndarray:
    """Sample ``index``'s image, (side, side, 3) uint8; a pure function of its arguments."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(VARIANTS)}")
    rng = np.random.default_rng([seed, IMAGE_STREAM, index])
    variant = variant_of(seed, index, kind)
    if kind == "noisy_image":
        pixels, target = _single(rng, label, side, (0.3, 0.7))
        return _to_uint8(_corrupt(rng, pixels, target))
    if variant == "single":
        pixels, _ = _single(rng, label, side, (0.3, 0.7))
    elif variant == "easy":
        pixels, _ = _single(rng, label, side, (0.5, 0.72))
    elif variant == "hard":
        pixels = _cluttered(rng, label, side)
    else:
        pixels = _group(rng, label, variant, side)
    return _to_uint8(_sensor_noise(rng, pixels))
