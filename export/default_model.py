"""``dynfuse build-default``: the embedded default model, synthetic benchmark -> training -> export.

Idempotent: with the model already in the store it does nothing and says so. The intermediate data
and run directory are kept under ``work_dir`` (reused by a rerun after an interruption, and
what ``dynfuse evaluate --data`` points at).
"""

from __future__ import annotations

import time
from pathlib import Path

from export.store import list_store
from export.writer import export_run
from models.data.synthetic import GENERATOR_VERSION, SynthConfig, generate
from models.registry import create_model
from models.training import CHECKPOINT, TrainConfig, train

DEFAULT_NAME = "shapes"
DEFAULT_WORK_DIR = Path("build/default-model")


def build_default(
    store: Path,
    *,
    work_dir: Path = DEFAULT_WORK_DIR,
    preset: str = "default",
    size: int | None = None,
    seed: int = 0,
    name: str = DEFAULT_NAME,
    progress: bool = True,
    log=print,
) -> Path | None:
    """Build and export the default model unless the store has it; returns the new version's directory."""
    existing = list_store(store).get(name)
    if existing:
        log(f"model {name!r} (versions {', '.join(existing)}) is already in {store}: nothing to build")
        return None
    started = time.perf_counter()
    image_size = create_model(f"dynamic_fusion_{preset}").config.image_size
    synth = SynthConfig(seed=seed, image_size=image_size, **({"size": size} if size else {}))
    # The name pins everything the data depends on, so a changed generator never reuses stale data.
    data_dir = Path(work_dir) / f"data-g{GENERATOR_VERSION}-{synth.size}-s{synth.seed}-{synth.image_size}px"
    if (data_dir / "synth.json").is_file():
        log(f"reusing the synthetic benchmark in {data_dir}")
    else:
        log(f"1/3 synthetic benchmark: {synth.size} samples at {image_size}x{image_size} -> {data_dir}")
        generate(data_dir, synth, progress=progress)
    run_dir = Path(work_dir) / f"run-{preset}-s{seed}-{data_dir.name}"
    if (run_dir / CHECKPOINT).is_file():
        log(f"reusing the trained run in {run_dir}")
    else:
        log(f"2/3 training the {preset} preset -> {run_dir}")
        train(data_dir, run_dir, TrainConfig(preset=preset, seed=seed), progress=progress, log=log)
    log(f"3/3 exporting to {store}")
    target = export_run(run_dir, store, name=name, progress=progress, log=log)
    log(f"built the default model in {time.perf_counter() - started:.0f} s")
    return target
