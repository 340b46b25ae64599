"""The one dataset format dynfuse reads: JSON-lines manifests next to an image folder.

A data directory holds ``train.jsonl``, ``val.jsonl`` (or ``dev.jsonl``, ...) and ``test.jsonl``, one sample per
line: ``{"id": ..., "img": "img/0001.png", "text": "...", "label": ...}``, with ``img`` relative to the manifest's
own directory. This is Hateful Memes' layout as released, so that dataset (and others converted to it) reads as is;
the synthetic benchmark writes the same format.

Every problem is a ``ManifestError`` whose message starts with ``<file>:<line>:`` and says how to fix it: a bad line
in a 10,000-line file must be findable without a debugger. The module needs only the standard library and Pillow,
because the serving process (which has no torch) imports it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from models.errors import DynfuseError
from models.preprocess import to_rgb

# Names a split may have on disk, in the order they are looked for. Hateful Memes calls its validation split
# "dev" (or "dev_seen" in the Phase 2 release) and its labelled test split "test_seen".
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "dev", "dev_seen", "validation"),
    "test": ("test", "test_seen"),
}
MANIFEST_SUFFIX = ".jsonl"
_EXAMPLE_LINE = '{"id": "0001", "img": "img/0001.png", "text": "a caption", "label": "cat"}'
_NUMERIC = re.compile(r"[+-]?\d+(\.\d+)?")
_MAX_LABELS_SHOWN = 30  # Food-101 has 101 labels; an error message listing them all would bury the point


class ManifestError(DynfuseError, ValueError):
    """A manifest (or a file it points to) is unusable; the message starts with ``<file>:<line>: ``."""


@dataclass(frozen=True)
class Sample:
    id: str  # str(id): Hateful Memes' ids are ints, the synthetic benchmark's are zero-padded strings
    image_path: Path  # absolute; ``img`` resolved against the manifest's directory
    text: str  # may be "" (a sample without text), never None
    label: str | None  # str(label); None only when read with require_label=False and the line has none
    kind: str | None  # the optional "kind" field (the synthetic benchmark's sample kind), else None
    source: str  # "<manifest path>:<line>", so later failures (e.g. an image that fails to decode) can point here


def find_split_file(data_dir: Path, split: str) -> Path:
    """The manifest for ``split``: the first existing ``<alias>.jsonl`` in ``data_dir``.

    A split name that is not in ``SPLIT_ALIASES`` (e.g. "dev_unseen") is looked for under its own name.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ManifestError(f"{data_dir}: data directory not found; pass the directory that holds train.jsonl")
    candidates = _split_candidates(data_dir, split)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked_for = ", ".join(c.name for c in candidates)
    raise ManifestError(
        f"{data_dir}: no manifest for split '{split}'; looked for {looked_for}. "
        f"Put one JSON object per line in one of these files (e.g. {_EXAMPLE_LINE})"
    )


def has_split(data_dir: Path, split: str) -> bool:
    """Whether ``data_dir`` has a manifest for ``split`` under any of its names."""
    return any(candidate.is_file() for candidate in _split_candidates(Path(data_dir), split))


def _split_candidates(data_dir: Path, split: str) -> list[Path]:
    return [data_dir / f"{alias}{MANIFEST_SUFFIX}" for alias in SPLIT_ALIASES.get(split, (split,))]


def read_split(data_dir: Path, split: str, **kwargs: Any) -> list[Sample]:
    """``read_manifest`` of the file ``find_split_file`` picks for ``split``."""
    return read_manifest(find_split_file(data_dir, split), **kwargs)


def read_manifest(path: Path, *, require_label: bool = True, check_images: bool = True) -> list[Sample]:
    """Every sample of one JSONL manifest, in file order.

    ``require_label=False`` admits lines without a label (an unlabelled test split); ``check_images=False`` skips
    the existence check of each image file (it costs one stat per sample). Blank lines are skipped but counted,
    so line numbers in messages match what an editor shows.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    base_dir = path.parent.resolve()
    samples: list[Sample] = []
    first_line_of_id: dict[str, int] = {}
    for line_number, line in _numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        sample = _parse_line(line, where, base_dir, require_label=require_label, check_images=check_images)
        if sample.id in first_line_of_id:
            raise ManifestError(
                f"{where}: duplicate id '{sample.id}' (first seen on line {first_line_of_id[sample.id]}); "
                "every sample in a manifest needs its own id"
            )
        first_line_of_id[sample.id] = line_number
        samples.append(sample)
    if not samples:
        raise ManifestError(f"{path}: manifest is empty; it needs one JSON object per line, e.g. {_EXAMPLE_LINE}")
    return samples


def _numbered_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, decoded line); decoding per line lets a bad byte be reported with its line."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                message = f"{path}:{line_number}: not valid UTF-8 ({err.reason}); save the file as UTF-8"
                raise ManifestError(message) from None
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # editors on Windows add a byte-order mark
            yield line_number, line


def _parse_line(line: str, where: str, base_dir: Path, *, require_label: bool, check_images: bool) -> Sample:
    try:
        record = json.loads(line.rstrip("\r\n"))  # without the newline, the column of an error is on this line
    except json.JSONDecodeError as err:
        raise ManifestError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object, "
            f"e.g. {_EXAMPLE_LINE}"
        ) from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {_json_type(record)}; e.g. {_EXAMPLE_LINE}")
    sample_id = _id_or_label(record, "id", where, required=True)
    image_path = _image_path(record, where, base_dir, check_images=check_images)
    text = _text(record, where)
    label = _id_or_label(record, "label", where, required=require_label)
    kind = record.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise ManifestError(f"{where}: field 'kind' must be a string, got {_json_type(kind)}")
    return Sample(id=sample_id, image_path=image_path, text=text, label=label, kind=kind, source=where)


def _id_or_label(record: dict, field: str, where: str, *, required: bool) -> str | None:
    """Ids and labels may be strings or integers (Hateful Memes uses ints for both); they are kept as strings."""
    if field not in record or record[field] is None:
        if required:
            problem = f"field '{field}' is null" if field in record else f"missing field '{field}'"
            raise ManifestError(f"{where}: {problem}; every line needs id, img, text and label")
        return None
    value = record[field]
    # bool is an int subclass in Python, but true/false as a label is almost certainly a conversion mistake
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(f"{where}: field '{field}' must be a string or an integer, got {_json_type(value)}")
    if value == "":
        raise ManifestError(f"{where}: field '{field}' is empty; give it a non-empty value")
    return str(value)


def _image_path(record: dict, where: str, base_dir: Path, *, check_images: bool) -> Path:
    if "img" not in record:
        raise ManifestError(f"{where}: missing field 'img'; give the image path relative to the manifest's directory")
    relative = record["img"]
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: field 'img' must be a non-empty string path, got {_json_type(relative)}")
    image_path = (base_dir / relative).resolve()
    if check_images and not image_path.is_file():
        raise ManifestError(
            f"{where}: image file not found: {image_path} ('img' is resolved against the manifest's directory "
            f"{base_dir}); fix the path or add the file"
        )
    return image_path


def _text(record: dict, where: str) -> str:
    if "text" not in record:
        raise ManifestError(f'{where}: missing field \'text\'; use "text": "" for a sample without text')
    text = record["text"]
    if not isinstance(text, str):
        raise ManifestError(f"{where}: field 'text' must be a string, got {_json_type(text)}")
    return text


def _json_type(value: object) -> str:
    """The JSON name of a value's type, as the person who wrote the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return "a list" if isinstance(value, list) else "an object"


def label_names(samples: Iterable[Sample]) -> list[str]:
    """Sorted unique labels; numeric-looking ones numerically ("2" before "10") and before the rest.

    Samples without a label (read with require_label=False) contribute nothing.
    """
    labels = {s.label for s in samples if s.label is not None}
    return sorted(labels, key=_label_sort_key)


def _label_sort_key(label: str) -> tuple[int, float, str]:
    if _NUMERIC.fullmatch(label):
        return (0, float(label), label)
    return (1, 0.0, label)


def check_labels(samples: Iterable[Sample], labels: Sequence[str]) -> None:
    """Raise on the first sample whose label is not in ``labels`` (the training split's labels).

    Unlabelled samples pass: they cannot be scored, but they are not wrong.
    """
    known = set(labels)
    for sample in samples:
        if sample.label is not None and sample.label not in known:
            raise ManifestError(
                f"{sample.source}: unknown label '{sample.label}'; the training split has: {_shown(labels)}. "
                "Fix the label, or add samples of it to the training split"
            )


def _shown(labels: Sequence[str]) -> str:
    if len(labels) <= _MAX_LABELS_SHOWN:
        return ", ".join(labels)
    return ", ".join(labels[:_MAX_LABELS_SHOWN]) + f", ... ({len(labels)} in all)"


def load_image_rgb(sample: Sample) -> Image.Image:
    """The sample's image, fully decoded and converted to RGB.

    Decoding is forced here (Pillow is lazy) so that a truncated file fails now, with the manifest line in the
    message, rather than later inside a data-loader worker.
    """
    try:
        with Image.open(sample.image_path) as image:
            image.load()
            return to_rgb(image)
    # Pillow signals bad files with OSError (missing, unidentified, truncated), SyntaxError (broken PNG chunks),
    # ValueError/EOFError (some plugins) or DecompressionBombError (absurd pixel counts).
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise ManifestError(f"{sample.source}: image {sample.image_path} cannot be read: {reason}") from err
