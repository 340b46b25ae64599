"""Figure 2: realized savings on CPU. Wall-clock of the served pipeline with route=auto against the
model's full expert forced, over the whole test split, in one run.

The pipeline is the one ``dynfuse serve`` runs (ONNX Runtime on CPU, the store's components, the
same thread settings), called in batches of the serving batch size. Decoding and preprocessing are
done once, before any timing, so the clock sees only what routing can save: encoders, router and
experts. The two policies alternate round by round (A/B, then B/A) so that drifts of the machine
fall on both; each round covers the whole split. The MAdds come from the pipeline's own outputs.

    python -m bench.realized_savings [--rounds 15] [--single-rounds 7]
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
    spread,
    wait_for_quiet,
    write_result,
)

GOAL_RATIO = 0.7  # time saved must be at least this fraction of the MAdds saved


def one_pass(pipeline, batches: list[list]) -> dict:
    """Run every batch once; wall-clock seconds, MAdds and the per-expert seconds the pipeline reports."""
    expert_seconds: dict[str, float] = {}
    madds = 0
    labels = []
    started = time.perf_counter()
    for batch in batches:
        outputs, seconds = pipeline.predict(batch)
        madds += sum(out.madds for out in outputs)
        labels += [out.label for out in outputs]
        for expert, value in seconds.items():
            expert_seconds[expert] = expert_seconds.get(expert, 0.0) + value
    return {
        "seconds": time.perf_counter() - started,
        "madds": madds,
        "expert_seconds": expert_seconds,
        "labels": labels,
    }


def compare(pipeline, auto_inputs: list, full_inputs: list, batch_size: int, rounds: int, samples: list[dict]) -> dict:
    """Interleaved A/B rounds over the split; per-policy times, MAdds and their ratio."""
    forced = pipeline.model.full_expert
    policies = {"auto": chunks(auto_inputs, batch_size), forced: chunks(full_inputs, batch_size)}
    passes: dict[str, list[dict]] = {name: [] for name in policies}
    for round_index in range(rounds):
        order = list(policies) if round_index % 2 == 0 else list(reversed(policies))
        for name in order:
            passes[name].append(one_pass(pipeline, policies[name]))
    truth = [s["label"] for s in samples]
    result = {"batch_size": batch_size, "rounds": rounds, "requests_per_pass": len(auto_inputs), "forced": forced}
    result["policies"] = {}
    for name, runs in passes.items():
        seconds = [r["seconds"] for r in runs]
        result["policies"][name] = {
            "seconds": spread(seconds),
            "requests_per_second": len(auto_inputs) / statistics.median(seconds),
            "madds_per_request": runs[0]["madds"] / len(auto_inputs),
            "accuracy": sum(a == b for a, b in zip(runs[0]["labels"], truth, strict=True)) / len(truth),
            "expert_seconds_median": {
                e: statistics.median(r["expert_seconds"].get(e, 0.0) for r in runs) for e in runs[0]["expert_seconds"]
            },
        }
    auto, full = passes["auto"], passes[forced]
    paired = [1.0 - a["seconds"] / f["seconds"] for a, f in zip(auto, full, strict=True)]
    madds_saved = 1.0 - auto[0]["madds"] / full[0]["madds"]
    time_saved = statistics.median(paired)
    result |= {
        "madds_saved": madds_saved,
        "time_saved": time_saved,
        "time_saved_per_round": spread(paired),
        "time_saved_over_madds_saved": time_saved / madds_saved,
        "ratio_per_round": spread([p / madds_saved for p in paired]),
        "goal_ratio": GOAL_RATIO,
        "goal_met": time_saved / madds_saved >= GOAL_RATIO,
    }
    return result


def report(name: str, result: dict) -> list[list]:
    forced = result["forced"]
    auto, full = result["policies"]["auto"], result["policies"][forced]
    rows = []
    for policy, figures in (("auto", auto), (f"{forced} (forced, the full path)", full)):
        s = figures["seconds"]
        rows.append(
            [
                name,
                policy,
                f"{figures['madds_per_request']:,.0f}",
                f"{1000 * s['median']:.0f} ({1000 * s['min']:.0f}–{1000 * s['max']:.0f})",
                f"{figures['requests_per_second']:,.0f}",
                f"{figures['accuracy']:.2%}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, help="default: the serving max_batch_size (DYNFUSE_MAX_BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=15, help="A/B rounds at the serving batch size")
    parser.add_argument("--single-rounds", type=int, default=7, help="A/B rounds with a batch of 1 (0: skip)")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "realized_savings.json")
    args = parser.parse_args(argv)

    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from service.config import Settings

    settings = Settings(store=args.store)
    batch_size = args.batch_size or settings.max_batch_size
    model = load_model(args.store, settings.model, settings.model_version)
    backend = create_backend("onnx", "cpu", settings.threads)
    pipeline = DynamicPipeline(model, backend)
    pipeline.warmup(batch_sizes=(1, batch_size))  # as the server does before it reports ready

    samples = load_test_split(args.data, args.split)
    auto_inputs = decoded_inputs(pipeline, samples)  # decoded and preprocessed once, outside every timing
    full_inputs = [dataclasses.replace(x, route=model.full_expert) for x in auto_inputs]
    print(f"{model.name} v{model.version} ({backend.describe()}), {len(samples)} {args.split} samples")

    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    results = {}
    for name, size, rounds in (("serving batch", batch_size, args.rounds), ("batch of 1", 1, args.single_rounds)):
        if rounds <= 0:
            continue
        started = time.perf_counter()
        with CpuWatch() as watch:
            results[name] = compare(pipeline, auto_inputs, full_inputs, size, rounds, samples)
        results[name]["foreign_cpu_share"] = watch.foreign_share
        print(f"{name} ({size}): {rounds} A/B rounds in {time.perf_counter() - started:.0f} s")

    header = ["case", "policy", "MAdds/request", "ms per split, median (min–max)", "req/s", "accuracy"]
    print("\n" + markdown_table(header, [row for name, r in results.items() for row in report(name, r)]))
    summary_rows = [
        [
            f"{name} ({r['batch_size']})",
            f"{r['madds_saved']:.1%}",
            f"{r['time_saved']:.1%} ({r['time_saved_per_round']['min']:.1%}–{r['time_saved_per_round']['max']:.1%})",
            f"{r['time_saved_over_madds_saved']:.2f}",
            "met" if r["goal_met"] else "NOT met",
            f"{r['foreign_cpu_share']:.0%}",
        ]
        for name, r in results.items()
    ]
    header = [
        "case",
        "MAdds saved",
        "time saved, median (min–max)",
        "time / MAdds",
        f"goal ≥ {GOAL_RATIO}",
        "other processes' CPU",
    ]
    print("\n" + markdown_table(header, summary_rows))
    write_result(
        args.out,
        {
            "figure": "realized savings on CPU",
            "model": model.name,
            "version": model.version,
            "backend": backend.describe(),
            "threads": settings.threads,
            "split": args.split,
            "samples": len(samples),
            "foreign_cpu_share_before": quiet,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
