"""``dynfuse build-default``: the embedded default model, synthetic benchmark -> training -> export.

Idempotent: with the model already in the store it does nothing and says so. The intermediate data
and run directory are kept under ``work_dir`` (reused by a rerun after an interruption, and
what ``dynfuse evaluate --data`` points at); the run directory's name carries the digest of the
training inputs, so a run made by other code is never reused.

The model built here is the one the repository ships in ``store/shapes/1`` (``make ship-default``
rebuilds and replaces it): ``model.json`` records its provenance (export/provenance.py).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from export import provenance
from export.store import FORMATS, list_store
from export.writer import export_run
from models.data.synthetic import GENERATOR_VERSION, SynthConfig, generate
from models.registry import create_model
from models.training import CHECKPOINT, TrainConfig, train

DEFAULT_NAME = "shapes"
DEFAULT_WORK_DIR = Path("build/default-model")
# Where the repository keeps the shipped default model, relative to its root; `make run` serves this store.
SHIPPED_STORE = Path("store")
SHIPPED_VERSION = "1"


def build_config(preset: str = "default", size: int | None = None, seed: int = 0) -> tuple[SynthConfig, TrainConfig]:
    """The data and training configuration of a default-model build."""
    image_size = create_model(f"dynamic_fusion_{preset}").config.image_size
    synth = SynthConfig(seed=seed, image_size=image_size, **({"size": size} if size else {}))
    return synth, TrainConfig(preset=preset, seed=seed)


def describe_build(synth: SynthConfig, train_config: TrainConfig) -> dict:
    """The build's configuration as recorded in the provenance, and digested with the training inputs (as JSON
    reads it back: lists, not tuples)."""
    described = {
        "data": {**asdict(synth), "generator_version": GENERATOR_VERSION},
        "train": {k: v for k, v in asdict(train_config).items() if k != "threads"},  # threads decide speed only
    }
    return json.loads(json.dumps(described))


def build_default(
    store: Path,
    *,
    work_dir: Path = DEFAULT_WORK_DIR,
    preset: str = "default",
    size: int | None = None,
    seed: int = 0,
    name: str = DEFAULT_NAME,
    formats: tuple[str, ...] = FORMATS,
    command: str | None = None,
    progress: bool = True,
    log=print,
) -> Path | None:
    """Build and export the default model unless the store has it; returns the new version's directory."""
    existing = list_store(store).get(name)
    if existing:
        log(f"model {name!r} (versions {', '.join(existing)}) is already in {store}: nothing to build")
        return None
    started = time.perf_counter()
    synth, train_config = build_config(preset, size, seed)
    build = describe_build(synth, train_config)
    inputs = provenance.training_inputs(build)
    data_dir = default_data_dir(synth, work_dir)
    if (data_dir / "synth.json").is_file():
        log(f"reusing the synthetic benchmark in {data_dir}")
    else:
        log(f"1/3 synthetic benchmark: {synth.size} samples at {synth.image_size}x{synth.image_size} -> {data_dir}")
        generate(data_dir, synth, progress=progress)
    run_dir = Path(work_dir) / f"run-{preset}-s{seed}-{data_dir.name}-{inputs['digest'][:12]}"
    if (run_dir / CHECKPOINT).is_file():
        log(f"reusing the trained run in {run_dir}")
    else:
        log(f"2/3 training the {preset} preset -> {run_dir}")
        train(data_dir, run_dir, train_config, progress=progress, log=log)
    log(f"3/3 exporting to {store}")
    record = provenance.record(command or shlex.join(["dynfuse", *sys.argv[1:]]), build["data"], build)
    target = export_run(run_dir, store, name=name, formats=formats, provenance=record, progress=progress, log=log)
    log(f"built the default model in {time.perf_counter() - started:.0f} s")
    return target


def default_data_dir(synth: SynthConfig, work_dir: Path = DEFAULT_WORK_DIR) -> Path:
    """Where a build keeps its synthetic benchmark. The name pins everything the data depends on, so a changed
    generator never reuses stale data."""
    return Path(work_dir) / f"data-g{GENERATOR_VERSION}-{synth.size}-s{synth.seed}-{synth.image_size}px"
