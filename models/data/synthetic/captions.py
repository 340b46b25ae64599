"""Captions of the synthetic benchmark: the training family, and a held-out family used only by ``test_ood``.

The held-out family rephrases every kind of caption with frames never seen in training, and half of its class
words are synonyms absent from the training vocabulary (the tests check that), so ``test_ood`` measures how
routing holds up on captions it has never seen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from models.data.synthetic.scenes import CAPTION_STREAM, variant_of

# Synonyms a caption may use for a class word. None of these words appears anywhere else in a caption template,
# so a caption's class words can be found by looking for these and nothing else (the tests do).
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
# Held out: only test_ood's captions use these, so the tokenizer built from training maps them to <unk>.
OOD_COLOUR_WORDS = {"red": ("ruby", "cherry"), "green": ("jade", "olive"), "blue": ("cobalt", "sapphire")}
OOD_SHAPE_WORDS = {
    "circle": ("orb", "round"),
    "square": ("tile", "quadrilateral"),
    "triangle": ("trigon", "delta"),
    "cross": ("saltire", "crosslet"),
}
OOD_WORD_SHARE = 0.5  # each class word of a held-out caption is a held-out synonym with this probability

# Where the object a cross-modal caption points at sits: "... {at}" and "the {most} ...".
AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
MOST = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "lowest"}

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
    "my drawing of a {c} {s}",
    "a lonely {c} {s}",
    "clearly a {c} {s}",
    "it is a {c} {s}",
    "look, a {c} {s}!",
    "the only object is a {c} {s}",
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
    "a dark, noisy photo of a {c} {s}",
    "an out-of-focus {c} {s}",
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
    "what do you see?",
    "an unknown object",
    "classify this image",
    "some kind of shape",
)
COLOUR_ONLY_TEMPLATES = (
    "something {c} is shown here",
    "a {c} object",
    "the object is {c}",
    "an item in {c}",
    "mostly {c}",
    "a {c} thing on a background",
    "its colour is {c}",
)
SHAPE_ONLY_TEMPLATES = (
    "a {s} of some colour",
    "there is a {s} here",
    "a {s} on a background",
    "the picture shows a {s}",
    "one {s}, colour not given",
    "some {s}, but which colour?",
)
# Cross-modal: the caption points at one of several objects; what it names is never the whole class.
POSITION_TEMPLATES = (
    "the object {at}",
    "what is the shape {at}?",
    "the {most} shape",
    "look at the one {at}",
    "name the object {at}",
    "the {most} object in the picture",
    "classify the {most} one",
)
COLOUR_QUERY_TEMPLATES = ("the {c} object", "which shape is {c}?", "the {c} one", "look at the {c} item")
SHAPE_QUERY_TEMPLATES = ("the {s}", "what colour is the {s}?", "look at the {s}", "classify the {s}")

# The held-out family: the same kinds of caption in frames training never uses.
OOD_CLEAR_TEMPLATES = (
    "you are looking at a {c} {s}",
    "depicted here: one {c} {s}",
    "this sketch features a {c} {s} and nothing else",
    "one {c} {s} is visible",
    "i would call this a {c} {s}",
    "the figure shown is a {c} {s}",
)
OOD_NOISY_TEMPLATES = ("a fuzzy capture of a {c} {s}", "low quality shot of a {c} {s}", "a faded, grainy {c} {s}")
OOD_GENERIC_CAPTIONS = (
    "mystery item",
    "an unlabelled figure",
    "identify this",
    "no description available",
    "what might this be",
    "untitled",
)
OOD_COLOUR_ONLY_TEMPLATES = ("it is {c} in hue", "the figure's hue is {c}", "predominantly {c}")
OOD_SHAPE_ONLY_TEMPLATES = ("the form is a {s}", "outline of a {s}", "shaped like a {s}")
OOD_POSITION_TEMPLATES = ("identify the figure {at}", "the {most} figure, please", "which item sits {at}?")
OOD_COLOUR_QUERY_TEMPLATES = ("the {c} figure", "which item is {c}?")
OOD_SHAPE_QUERY_TEMPLATES = ("the {s}-shaped figure", "what hue is the {s}?")

_ARTICLE = re.compile(r"\ba (?=[aeiou]|x\b)")  # "a emerald disc" -> "an emerald disc", "a x mark" -> "an x mark"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_caption(seed: int, index: int, label: str, kind: str, *, held_out: bool = False) -> str:
    """Sample ``index``'s caption; a pure function of its arguments. ``held_out``: from the held-out family."""
    rng = np.random.default_rng([seed, CAPTION_STREAM, index])
    colour, shape = label.split("_")
    if held_out:
        colour_word = _pick(rng, OOD_COLOUR_WORDS[colour] if rng.random() < OOD_WORD_SHARE else COLOUR_WORDS[colour])
        shape_word = _pick(rng, OOD_SHAPE_WORDS[shape] if rng.random() < OOD_WORD_SHARE else SHAPE_WORDS[shape])
    else:
        colour_word = _pick(rng, COLOUR_WORDS[colour])
        shape_word = _pick(rng, SHAPE_WORDS[shape])
    variant = variant_of(seed, index, kind)
    template = _template(rng, kind, variant, held_out)
    place = variant if kind == "cross_modal" else None  # left, right, top or bottom for position questions
    text = template.format(c=colour_word, s=shape_word, at=AT.get(place, ""), most=MOST.get(place, ""))
    return _ARTICLE.sub("an ", text)


def _template(rng: np.random.Generator, kind: str, variant: str, ood: bool) -> str:
    if kind == "text_sufficient":
        return _pick(rng, OOD_CLEAR_TEMPLATES if ood else CLEAR_TEMPLATES)
    if kind == "noisy_image":
        if rng.random() < 0.5:
            return _pick(rng, OOD_NOISY_TEMPLATES if ood else NOISY_TEMPLATES)
        return _pick(rng, OOD_CLEAR_TEMPLATES if ood else CLEAR_TEMPLATES)
    if kind == "image_needed":
        vagueness = rng.random()  # half generic, a quarter colour only, a quarter shape only
        if vagueness < 0.5:
            return _pick(rng, OOD_GENERIC_CAPTIONS if ood else GENERIC_CAPTIONS)
        if vagueness < 0.75:
            return _pick(rng, OOD_COLOUR_ONLY_TEMPLATES if ood else COLOUR_ONLY_TEMPLATES)
        return _pick(rng, OOD_SHAPE_ONLY_TEMPLATES if ood else SHAPE_ONLY_TEMPLATES)
    if kind == "image_decides":  # the caption says nothing: the picture alone decides which path is needed
        return _pick(rng, OOD_GENERIC_CAPTIONS if ood else GENERIC_CAPTIONS)
    if kind == "cross_modal":
        if variant == "colour":
            return _pick(rng, OOD_COLOUR_QUERY_TEMPLATES if ood else COLOUR_QUERY_TEMPLATES)
        if variant == "shape":
            return _pick(rng, OOD_SHAPE_QUERY_TEMPLATES if ood else SHAPE_QUERY_TEMPLATES)
        return _pick(rng, OOD_POSITION_TEMPLATES if ood else POSITION_TEMPLATES)
    raise ValueError(f"unknown kind {kind!r}")
