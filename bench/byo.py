"""Bring your own experts: the router trained over a user's frozen models, against the best of those models.

The walkthrough's models (examples/hf_experts: a tiny BERT text classifier and a tiny ViT image classifier,
fine-tuned on the training split and saved with save_pretrained) and its three experts (text, image, late
fusion of both), on a synthetic benchmark; ``dynfuse train-router`` then trains only the router. Reported on
the test split: ``auto`` (the served router) against the most accurate single expert, in accuracy and in MAdds
per sample (router and its encoders included), every lambda's point, and where the time went.

    python -m bench.byo [--size 3000] [--epochs 12] [--work build/bench-byo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, RESULTS, markdown_table, write_result

EXPERTS = ("text", "image", "both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3000, help="synthetic samples over train, val and test")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs of the example models")
    parser.add_argument("--preset", default="tiny", help="size of the router's own encoders")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-byo")
    parser.add_argument("--out", type=Path, default=RESULTS / "byo.json")
    args = parser.parse_args()

    from models.byo.training import train_router_only
    from models.data.synthetic import SynthConfig, generate
    from models.training import TrainConfig

    work = args.work / f"s{args.size}-{args.image_size}px-e{args.epochs}"
    data, models, run = work / "data", work / "models", work / f"run-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not data.exists():
        generate(data, SynthConfig(size=args.size, seed=0, image_size=args.image_size, ood_size=0), progress=False)
    if not (models / "summary.json").exists():
        subprocess.run(
            [sys.executable, "examples/hf_experts/make_models.py", "--data", str(data), "--out", str(models),
             "--epochs", str(args.epochs), "--image-size", str(args.image_size)],
            cwd=REPO, check=True,
        )  # fmt: skip
    os.environ["DYNFUSE_EXAMPLE_MODELS"] = str(models)
    started = time.perf_counter()
    summary = train_router_only(
        data,
        run,
        [f"{name}=examples.hf_experts.experts:{name}" for name in EXPERTS],
        TrainConfig(preset=args.preset, seed=0),
        search=(REPO,),
        progress=False,
    )
    seconds = time.perf_counter() - started

    rows = {row["policy"]: row for row in summary["evaluation"]["test"]}
    statics = {name: rows[f"static:{name}"] for name in EXPERTS}
    best = max(statics, key=lambda name: statics[name]["accuracy"])
    auto = rows["auto"]
    result = {
        "split": "test",
        "samples": summary["data"]["sizes"]["test"],
        "example_models": json.loads((models / "summary.json").read_text()),
        "experts": {name: _point(row) for name, row in statics.items()},
        "most_accurate_expert": best,
        "full_expert": summary["full_expert"],
        "served_router": summary["default_router"],
        "auto": _point(auto) | {"route_mix": auto["route_mix"]},
        "auto_vs_most_accurate": {
            "accuracy_points": round(100 * (auto["accuracy"] - statics[best]["accuracy"]), 2),
            "madds_saved": round(1 - auto["madds_per_sample"] / statics[best]["madds_per_sample"], 4),
        },
        "lambdas": {name: _point(row) for name, row in rows.items() if name.startswith("lambda=")},
        "oracle": _point(rows["oracle"]),
        "train_router_seconds": round(seconds, 1),
        "timings": summary["timings"],
        "preset": args.preset,
    }
    write_result(args.out, result)
    table = [[name, f"{p['accuracy']:.2%}", f"{p['madds_per_sample']:,}"] for name, p in result["experts"].items()]
    table += [["auto", f"{auto['accuracy']:.2%}", f"{auto['madds_per_sample']:,}"]]
    print(markdown_table(["policy (test)", "accuracy", "MAdds/sample"], table))  # noqa: T201 - a script's report
    print(json.dumps(result["auto_vs_most_accurate"]))  # noqa: T201


def _point(row: dict) -> dict:
    return {"accuracy": round(row["accuracy"], 4), "madds_per_sample": int(row["madds_per_sample"])}


if __name__ == "__main__":
    main()
