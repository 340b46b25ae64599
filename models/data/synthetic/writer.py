"""Writing a synthetic data set: the plan (split, kind and label of every sample), the files, atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.data.synthetic.captions import make_caption
from models.data.synthetic.config import (
    GENERATOR_VERSION,
    KINDS,
    LABELS,
    OOD_SPLIT,
    SPLITS,
    SynthConfig,
    apportion,
)
from models.data.synthetic.scenes import PLAN_STREAM, render_image, variant_of
from models.staging import staging_dir


class OutputExistsError(FileExistsError):
    """The output directory already holds files and overwriting was not asked for."""


@dataclass(frozen=True)
class _Planned:
    index: int  # global sample index; the id and the image file name derive from it
    split: str
    kind: str
    label: str


def plan(config: SynthConfig) -> list[_Planned]:
    """Which split, kind and label each index gets.

    Kinds are assigned by exact counts (so each split's realized mix is the requested one up to rounding) and labels
    round-robin within each kind from a random starting class (so classes are balanced within every kind and split),
    then the split is shuffled. test_ood's indices follow the three splits'.
    """
    planned: list[_Planned] = []
    start = 0
    for split_number, (split, split_size) in enumerate(config.split_sizes.items()):
        rng = np.random.default_rng([config.seed, PLAN_STREAM, split_number])
        kinds_and_labels: list[tuple[str, str]] = []
        for kind, count in zip(KINDS, apportion(split_size, config.mix), strict=True):
            first = int(rng.integers(len(LABELS)))
            kinds_and_labels += [(kind, LABELS[(first + j) % len(LABELS)]) for j in range(count)]
        for offset, position in enumerate(rng.permutation(split_size)):
            kind, label = kinds_and_labels[position]
            planned.append(_Planned(index=start + offset, split=split, kind=kind, label=label))
        start += split_size
    return planned


def generate(
    out_dir: Path,
    config: SynthConfig = SynthConfig(),  # noqa: B008 (frozen, so one shared default is safe)
    *,
    progress: bool = True,
    overwrite: bool = False,
    splits: Sequence[str] | None = None,
) -> dict:
    """Write the benchmark to ``out_dir`` and return the content of its ``synth.json``.

    ``splits`` writes only those splits (e.g. test and test_ood to evaluate a model trained on this config):
    each sample written is byte for byte the one the whole data set has.

    Files are written to a sibling staging directory that is renamed into place at the end; on any failure it is
    removed, so ``out_dir`` is either complete or untouched. An existing non-empty ``out_dir`` raises
    ``OutputExistsError`` unless ``overwrite`` is set.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite=overwrite)
    staging = staging_dir(out_dir)
    try:
        summary = _write_dataset(staging, config, progress=progress, splits=splits)
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


def save_png(pixels: np.ndarray, path: Path) -> None:
    # Pillow's PNG writer stores no timestamp, so equal pixels give equal bytes (for a given zlib).
    Image.fromarray(pixels).save(path, format="PNG")


def _write_dataset(root: Path, config: SynthConfig, *, progress: bool, splits: Sequence[str] | None = None) -> dict:
    planned = plan(config)
    unknown = sorted(set(splits or ()) - set(config.split_sizes))
    if unknown:
        raise ValueError(f"splits {unknown} are not in this config's {sorted(config.split_sizes)}")
    (root / "img").mkdir()
    id_width = max(6, len(str(len(planned) - 1)))  # from the whole plan: ids do not depend on what is written
    lines: dict[str, list[str]] = {split: [] for split in config.split_sizes if splits is None or split in splits}
    written = [item for item in planned if item.split in lines]
    for item in tqdm(written, desc="synthetic samples", unit="img", disable=not progress):
        sample_id = f"{item.index:0{id_width}d}"
        image_file = f"img/{sample_id}.png"
        save_png(render_image(config.seed, item.index, item.label, item.kind, config.image_size), root / image_file)
        held_out = item.split == OOD_SPLIT
        record = {  # fixed key order: part of byte-identical output
            "id": sample_id,
            "img": image_file,
            "text": make_caption(config.seed, item.index, item.label, item.kind, held_out=held_out),
            "label": item.label,
            "kind": item.kind,
            "variant": variant_of(config.seed, item.index, item.kind),
        }
        lines[item.split].append(json.dumps(record))
    for split, split_lines in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(split_lines) + "\n", encoding="utf-8", newline="\n")
    summary = _summary(config, planned)
    if splits is not None:
        summary["written_splits"] = list(lines)  # the counts are the whole data set's; these files were written
    (root / "synth.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8", newline="\n")
    return summary


def _summary(config: SynthConfig, planned: Sequence[_Planned]) -> dict:
    counts = {split: {"total": 0, **dict.fromkeys(KINDS, 0)} for split in config.split_sizes}
    for item in planned:
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
            "ood_size": config.split_sizes.get(OOD_SPLIT, 0),
        },
        "labels": list(LABELS),
        "kinds": list(KINDS),
        "counts": counts,
    }
