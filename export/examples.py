"""Examples shipped with a model: a handful of test-split image-text pairs copied into the exported version.

The playground (``GET /``) offers them as a strip of one-click inputs, and ``GET /v1/models/{name}``
lists them. There is at least one per case kind when the manifest has kinds (the synthetic
benchmark's text_sufficient, image_needed, noisy_image), else a few. Each file is listed in
``model.json`` with its sha256, so the store verifies it at load like any component.

No torch here: serving imports ``example_path``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from PIL import Image

from export.store import sha256_file
from models.data.manifest import ManifestError, Sample, has_split, read_split

EXAMPLES_DIR = "examples"
PER_KIND = 2  # two per kind: the strip stays short and still shows each kind twice
WITHOUT_KINDS = 6  # a manifest without kinds gets this many
MAX_EXAMPLES = 12  # beyond this a strip stops being a glance; with more kinds than this, one per kind
MAX_IMAGE_BYTES = 1 << 20  # a playground example need not be a 20 MB photo, and the store stays small
# Formats a browser can show and the server decodes (Pillow's name), with their copy's suffix and media type.
FORMATS = {
    "PNG": (".png", "image/png"),
    "JPEG": (".jpg", "image/jpeg"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
    "BMP": (".bmp", "image/bmp"),
}
MEDIA_TYPES = dict(FORMATS.values())


def write_examples(data_dir: Path | str | None, staging: Path, *, log=print) -> list[dict]:
    """Copy a few test-split (else val-split) pairs into ``staging/examples/`` and return their entries
    for model.json: id, kind, text, label, file (relative to the version directory) and sha256.

    Missing or unreadable data means no examples, logged: an export never fails for want of them."""
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is None or not data_dir.is_dir():
        log(f"no examples shipped with the model: data directory {data_dir} not found")
        return []
    split = next((s for s in ("test", "val") if has_split(data_dir, s)), None)
    if split is None:
        log(f"no examples shipped with the model: {data_dir} has no test or val split")
        return []
    try:
        samples = read_split(data_dir, split, require_label=False)
    except ManifestError as error:
        log(f"no examples shipped with the model: {error}")
        return []

    entries = []
    for position, (sample, suffix) in enumerate(_choose(samples)):
        file = f"{EXAMPLES_DIR}/{position:02d}{suffix}"  # not the sample's id: ids may hold any character
        (staging / EXAMPLES_DIR).mkdir(exist_ok=True)
        shutil.copyfile(sample.image_path, staging / file)
        entries.append(
            {
                "id": sample.id,
                "kind": sample.kind,
                "text": sample.text,
                "label": sample.label,
                "file": file,
                "sha256": sha256_file(staging / file),
            }
        )
    log(f"shipped {len(entries)} examples from the {split} split")
    return entries


def _choose(samples: list[Sample]) -> list[tuple[Sample, str]]:
    """Per kind (in order of first appearance), the first usable samples in file order, the least shown
    labels first: six red circles would show the router little."""
    by_kind: dict[str | None, list[Sample]] = {}
    for sample in samples:
        by_kind.setdefault(sample.kind, []).append(sample)
    quota = PER_KIND if len(by_kind) * PER_KIND <= MAX_EXAMPLES else 1
    if list(by_kind) == [None]:  # no kinds at all
        quota = WITHOUT_KINDS
    chosen: list[tuple[Sample, str]] = []
    shown: Counter[str | None] = Counter()  # label -> examples chosen so far
    for members in by_kind.values():
        remaining = list(members)
        for _ in range(quota):
            picked = _first_usable(sorted(remaining, key=lambda s: shown[s.label]))  # stable: file order on ties
            if picked is None:
                break
            remaining.remove(picked[0])
            shown[picked[0].label] += 1
            chosen.append(picked)
    return chosen


def _first_usable(candidates: list[Sample]) -> tuple[Sample, str] | None:
    for sample in candidates:
        suffix = _image_suffix(sample.image_path)
        if suffix is not None:
            return sample, suffix
    return None


def _image_suffix(path: Path) -> str | None:
    """The suffix for the file's real format, or None when it is too big or not an image a browser shows."""
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        with Image.open(path) as image:
            return FORMATS[image.format][0] if image.format in FORMATS else None
    except (OSError, SyntaxError, ValueError):  # Pillow's ways of saying "not an image I can read"
        return None


def example_path(model_dir: Path, entry: dict) -> Path | None:
    """The file of one model.json example entry, or None when it is missing or lies outside examples/."""
    folder = (Path(model_dir) / EXAMPLES_DIR).resolve()
    path = (Path(model_dir) / entry["file"]).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        return None
    return path


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
