"""Figure: "uncertain" answers. Which answers the server flags, on the test split, on test_ood, and on pictures
of random noise with vague captions.

Every input goes through the stored model's pipeline in this process (export/pipeline.py, the code the server
runs, at the server's default thresholds: DYNFUSE_UNCERTAIN_CONFIDENCE and DYNFUSE_UNCERTAIN_OOD_ALPHA), routed
as ``auto`` at the served operating point with its confidence floor. The noise pictures are uniform, Gaussian
and grey (one channel repeated) noise at 64, 256 and 512 pixels a side (the server resizes them to the model's
side: a large noise picture arrives smoothed), each with one of ten vague captions, half from the training
family's generic captions and half worded otherwise.

Goals (issue 22): at most 5% of the test answers flagged; at least 90% of the noise pictures flagged.

    python -m bench.uncertain [--store store] [--data build/heldout-s7]
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import DEFAULT_STORE, REPO, RESULTS, markdown_table, write_result
from bench.shift import HELD_OUT, held_out_data

GOAL_TEST_AT_MOST = 0.05
GOAL_NOISE_AT_LEAST = 0.90
VAGUE_CAPTIONS = (
    "what is this?",  # the training family's generic captions
    "an image",
    "something is shown here",
    "look at this picture",
    "a plain picture",
    "a photo of something",  # worded otherwise
    "no idea what this is",
    "random picture",
    "here is an upload",
    "tell me what you see",
)
NOISE_KINDS = ("uniform", "gaussian", "grey")
NOISE_SIDES = (64, 256, 512)
PER_CELL = 50


def noise_pictures(kind: str, side: int, count: int, rng: np.random.Generator) -> list[Image.Image]:
    if kind == "uniform":
        arrays = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    elif kind == "gaussian":
        arrays = np.clip(rng.normal(128, 60, (count, side, side, 3)), 0, 255).astype(np.uint8)
    else:
        arrays = np.clip(rng.normal(128, 60, (count, side, side, 1)), 0, 255).repeat(3, axis=-1).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def answers(pipeline, texts: list[str], pictures: list[Image.Image], batch: int = 64) -> list:
    """The answers as the server gives them to requests that name no policy: the served point with the
    store's confidence floor (model.json router.min_confidence)."""
    floor = pipeline.model.default_min_confidence
    out = []
    for start in range(0, len(texts), batch):
        chunk = zip(texts[start : start + batch], pictures[start : start + batch], strict=True)
        out += pipeline.predict([replace(pipeline.prepare(t, p), min_confidence=floor) for t, p in chunk])[0]
    return out


def flags(outputs, settings) -> list[str | None]:
    from models.ood import uncertain_reasons

    return uncertain_reasons(
        [o.confidence for o in outputs],
        [o.ood_pvalue for o in outputs],
        settings.uncertain_confidence,
        settings.uncertain_ood_alpha,
    )


def split_figures(pipeline, data: Path, split: str, settings) -> dict:
    from models.data.manifest import read_split

    samples = read_split(data, split)
    pictures = []
    for s in samples:
        with Image.open(io.BytesIO(s.image_path.read_bytes())) as image:
            pictures.append(image.convert("RGB"))
    outputs = answers(pipeline, [s.text for s in samples], pictures)
    reasons = flags(outputs, settings)
    flagged = np.array([r is not None for r in reasons])
    correct = np.array([o.label == s.label for o, s in zip(outputs, samples, strict=True)])
    return {
        "samples": len(samples),
        "flagged_share": float(flagged.mean()),
        "by_reason": {
            r: sum(x == r for x in reasons) / len(reasons) for r in ("low_confidence", "out_of_distribution")
        },
        "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
        "accuracy_unflagged": float(correct[~flagged].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, default=HELD_OUT)
    parser.add_argument("--out", type=Path, default=RESULTS / "uncertain.json")
    args = parser.parse_args(argv)

    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from service.config import Settings

    settings = Settings(store=args.store)  # the server's defaults (and any DYNFUSE_* set)
    model = load_model(args.store, args.model)
    pipeline = DynamicPipeline(model, create_backend("onnx", "cpu"))
    data = held_out_data(args.data)
    splits = {split: split_figures(pipeline, data, split, settings) for split in ("test", "test_ood")}

    rng = np.random.default_rng(0)
    noise, rows = {}, []
    for kind in NOISE_KINDS:
        for side in NOISE_SIDES:
            texts = [VAGUE_CAPTIONS[i % len(VAGUE_CAPTIONS)] for i in range(PER_CELL)]
            outputs = answers(pipeline, texts, noise_pictures(kind, side, PER_CELL, rng))
            reasons = flags(outputs, settings)
            cell = {
                "pictures": PER_CELL,
                "flagged_share": sum(r is not None for r in reasons) / PER_CELL,
                "out_of_distribution": sum(r == "out_of_distribution" for r in reasons) / PER_CELL,
                "low_confidence": sum(r == "low_confidence" for r in reasons) / PER_CELL,
                "median_top_probability": float(np.median([o.probabilities.max() for o in outputs])),
                "experts": {e: sum(o.expert == e for o in outputs) for e in sorted({o.expert for o in outputs})},
            }
            noise[f"{kind}_{side}"] = cell
            rows.append([kind, side, f"{cell['flagged_share']:.0%}", f"{cell['out_of_distribution']:.0%}",
                         f"{cell['low_confidence']:.0%}", f"{cell['median_top_probability']:.3f}"])  # fmt: skip
    noise_share = float(np.mean([c["flagged_share"] for c in noise.values()]))
    goals = {
        "test_flagged_at_most": {
            "goal": GOAL_TEST_AT_MOST,
            "measured": splits["test"]["flagged_share"],
            "met": splits["test"]["flagged_share"] <= GOAL_TEST_AT_MOST,
        },
        "noise_flagged_at_least": {
            "goal": GOAL_NOISE_AT_LEAST,
            "measured": noise_share,
            "met": noise_share >= GOAL_NOISE_AT_LEAST,
            "worst_cell": min(c["flagged_share"] for c in noise.values()),
        },
    }
    print(markdown_table(["noise", "side", "flagged", "out of distribution", "low confidence", "median top p"], rows))
    for split, figures in splits.items():
        print(f"{split}: {figures}")
    print(goals)
    write_result(
        args.out,
        {
            "figure": "uncertain answers",
            "model": model.name,
            "version": model.version,
            "data": str(data.relative_to(REPO) if data.is_relative_to(REPO) else data),
            "thresholds": {
                "uncertain_confidence": settings.uncertain_confidence,
                "uncertain_ood_alpha": settings.uncertain_ood_alpha,
            },
            "splits": splits,
            "noise": noise,
            "noise_captions": list(VAGUE_CAPTIONS),
            "goals": goals,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
