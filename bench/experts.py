"""Figure 1b: the cost ladder, expert by expert, and what the routers' modality weights say per case kind.

For every expert of the stored model: its accuracy alone on each case kind of the test split (and on
``test_ood``), its MAdds, and its wall-clock per sample at the serving batch size on this CPU (the served
pipeline with the route forced, inputs decoded beforehand, the experts interleaved round by round). Then the
served router's modality weights (``route.modality_weights``), per case kind: mean and quartiles of the image's. What
decided the answers (``importance``) is bench/importance.py's.

    python -m bench.experts [--store store] [--data build/default-model/data-g2-8000-s0-64px] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DEFAULT_STORE,
    RESULTS,
    CpuWatch,
    chunks,
    decoded_inputs,
    load_test_split,
    markdown_table,
    wait_for_quiet,
    write_result,
)

GOAL_CROSS_MODAL_POINTS = 10.0  # the best of mi2p and muse over late_fusion on the cross-modal kind


def time_experts(pipeline, inputs: list, batch_size: int, rounds: int) -> dict[str, float]:
    """Milliseconds per sample of each expert forced over ``inputs`` (median over interleaved rounds)."""
    batches = {
        expert: chunks([dataclasses.replace(x, route=expert) for x in inputs], batch_size)
        for expert in pipeline.experts
    }
    seconds: dict[str, list[float]] = {expert: [] for expert in batches}
    for _ in range(rounds):
        for expert, expert_batches in batches.items():
            started = time.perf_counter()
            for batch in expert_batches:
                pipeline.predict(batch)
            seconds[expert].append(time.perf_counter() - started)
    return {expert: 1000 * statistics.median(s) / len(inputs) for expert, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over the test split")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "experts.json")
    args = parser.parse_args(argv)

    from export.backends import create_backend
    from export.evaluate import evaluate_store
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from models.evaluation import find_row
    from service.config import Settings

    settings = Settings(store=args.store)
    evaluated = {
        split: evaluate_store(args.store, settings.model, args.data, split=split, progress=False)[0]
        for split in ("test", "test_ood")
    }
    model = load_model(args.store, settings.model, settings.model_version)
    pipeline = DynamicPipeline(model, create_backend("onnx", "cpu", settings.threads))
    pipeline.warmup(batch_sizes=(1, settings.max_batch_size))
    inputs = decoded_inputs(pipeline, load_test_split(args.data))
    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    with CpuWatch() as watch:
        ms_per_sample = time_experts(pipeline, inputs, settings.max_batch_size, args.rounds)

    test = evaluated["test"]
    kinds = sorted(find_row(test, "auto")["accuracy_by_kind"])
    experts = []
    for expert in model.experts:
        row, ood = find_row(test, f"static:{expert.name}"), find_row(evaluated["test_ood"], f"static:{expert.name}")
        experts.append(
            {
                "expert": expert.name,
                "modalities": list(expert.modalities),
                "madds_static": int(row["madds_per_sample"]),
                "madds_routed": expert.path_madds,
                "ms_per_sample": ms_per_sample[expert.name],
                "accuracy": row["accuracy"],
                "accuracy_by_kind": row["accuracy_by_kind"],
                "accuracy_test_ood": ood["accuracy"],
                "full_path": expert.name == model.full_expert,
            }
        )
    by_name = {e["expert"]: e for e in experts}
    cross = {name: by_name[name]["accuracy_by_kind"].get("cross_modal", float("nan")) for name in by_name}
    cross_gain = 100 * (max(cross.get("mi2p", 0.0), cross.get("muse", 0.0)) - cross.get("late_fusion", 0.0))
    auto = find_row(test, "auto")
    weights = auto.get("modality_weights", auto.get("importance", {})).get("image_by_kind", {})
    means = {kind: figures["mean"] for kind, figures in weights.items()}
    weights_range = max(means.values()) - min(means.values()) if means else float("nan")

    header = ["expert", "MAdds (alone)", "ms/sample (batch 16)", "accuracy", *kinds, "test_ood"]
    rows = [
        [
            f"`{e['expert']}`" + (" (full)" if e["full_path"] else ""),
            f"{e['madds_static']:,}",
            f"{e['ms_per_sample']:.3f}",
            f"{e['accuracy']:.1%}",
            *(f"{e['accuracy_by_kind'][k]:.1%}" for k in kinds),
            f"{e['accuracy_test_ood']:.1%}",
        ]
        for e in experts
    ]
    print(markdown_table(header, rows))
    print(
        "\n"
        + markdown_table(
            ["case kind", "route.modality_weights.image mean", "q1", "median", "q3"],
            [
                [k, f"{f['mean']:.3f}", f"{f['q1']:.3f}", f"{f['median']:.3f}", f"{f['q3']:.3f}"]
                for k, f in weights.items()
            ],
        )
    )
    print(
        f"\ncross-modal: best of mi2p/muse {cross_gain:+.1f} points over late_fusion (goal >= "
        f"{GOAL_CROSS_MODAL_POINTS:g}); the image's modality weight ranges {weights_range:.3f} over kinds; other "
        f"processes used {watch.foreign_share:.0%} of the CPU while timing"
    )
    write_result(
        args.out,
        {
            "figure": "the cost ladder, expert by expert",
            "model": model.name,
            "version": model.version,
            "batch_size": settings.max_batch_size,
            "rounds": args.rounds,
            "foreign_cpu_share_before": quiet,
            "foreign_cpu_share": watch.foreign_share,
            "experts": experts,
            "cross_modal_gain_points": cross_gain,
            "modality_weights_image_by_kind": weights,
            "modality_weights_range": weights_range,
            "goals": {
                "cross_modal_points": {
                    "at_least": GOAL_CROSS_MODAL_POINTS,
                    "met": cross_gain >= GOAL_CROSS_MODAL_POINTS,
                },
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
