"""Where the pipeline's CPU goes, per pair: each component's ONNX Runtime calls, and the Python and NumPy around them
(stacking, routing, gathering sub-batches, normalizing, the outputs), for ``route=auto`` and the full expert forced.

In process, one runtime thread (so that the calling thread's CPU time is all the runtime's work), batches of
``--batch`` pre-decoded held-out pairs, the two routes alternating ``--rounds`` times; the round of median total.
The difference between the routes is what routing saves in the model; the glue is paid whatever the route.

    python -m bench.pipeline_cost [--batch 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time
from pathlib import Path

from bench.common import DEFAULT_STORE, RESULTS, chunks, decoded_inputs, load_test_split, markdown_table, write_result
from service.config import Settings

HELD_OUT_SEED = 7  # bench/peer_compare.py's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"held-out data set (default: made with seed {HELD_OUT_SEED})")
    parser.add_argument(
        "--batch",
        type=int,
        default=Settings.model_fields["max_batch_size"].default,
        help="pairs per predict call (default: the serving max_batch_size)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=480, help="held-out pairs per round")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also the CPU of each stage of predict (attribution, answers, OOD p-values, ...), each stage's time with "
        "the runtime calls it makes",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_cost.json")
    args = parser.parse_args(argv)

    from bench.peer_compare import held_out_data
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model

    data = args.data or held_out_data(args.store, None, HELD_OUT_SEED)
    model = load_model(args.store)
    backend = create_backend("onnx", "cpu", 1)
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    rows: collections.Counter = collections.Counter()
    load = backend.load

    def timed_load(component):
        run = load(component)

        def timed(inputs):
            started = time.thread_time()
            outputs = run(inputs)
            seconds[component.name] += time.thread_time() - started
            calls[component.name] += 1
            rows[component.name] += len(next(iter(outputs.values())))
            return outputs

        return timed

    backend.load = timed_load
    pipeline = DynamicPipeline(model, backend)
    stages: dict[str, float] = collections.defaultdict(float)
    if args.stages:
        time_stages(pipeline, stages)
    pipeline.warmup(batch_sizes=(1, args.batch))
    inputs = decoded_inputs(pipeline, load_test_split(data)[: args.pairs])
    routes = {"auto": inputs, model.full_expert: [dataclasses.replace(x, route=model.full_expert) for x in inputs]}
    runs: dict[str, list[dict]] = {route: [] for route in routes}
    for index in range(args.rounds):
        for route in routes if index % 2 == 0 else reversed(routes):
            seconds.clear()
            calls.clear()
            rows.clear()
            stages.clear()
            started = time.thread_time()
            for batch in chunks(routes[route], args.batch):
                pipeline.predict(batch)
            total = time.thread_time() - started
            n = len(routes[route])
            runs[route].append(
                {
                    "total_us_per_pair": 1e6 * total / n,
                    "components_us_per_pair": {name: 1e6 * s / n for name, s in seconds.items()},
                    "glue_us_per_pair": 1e6 * (total - sum(seconds.values())) / n,
                    "calls": dict(calls),
                    "rows": dict(rows),
                    "stages_us_per_pair": {name: 1e6 * s / n for name, s in stages.items()},
                }
            )

    summary = {}
    for route, route_runs in runs.items():
        # The round of median total, whole: medians taken figure by figure would not add up to a total.
        middle = sorted(route_runs, key=lambda r: r["total_us_per_pair"])[(len(route_runs) - 1) // 2]
        summary[route] = {
            "total_us_per_pair": middle["total_us_per_pair"],
            "total_us_per_pair_rounds": [r["total_us_per_pair"] for r in route_runs],
            "glue_us_per_pair": middle["glue_us_per_pair"],
            "components_us_per_pair": dict(sorted(middle["components_us_per_pair"].items())),
            "calls_per_batch": {name: count / (len(inputs) / args.batch) for name, count in middle["calls"].items()},
            "stages_us_per_pair": dict(sorted(middle["stages_us_per_pair"].items(), key=lambda kv: -kv[1])),
        }
    names = sorted({n for s in summary.values() for n in s["components_us_per_pair"]})
    header = ["", *summary]
    body = [[name, *(f"{s['components_us_per_pair'].get(name, 0.0):.1f}" for s in summary.values())] for name in names]
    body.append(["Python and NumPy around them", *(f"{s['glue_us_per_pair']:.1f}" for s in summary.values())])
    body.append(["ONNX Runtime, all", *(f"{sum(s['components_us_per_pair'].values()):.1f}" for s in summary.values())])
    body.append(["**total**", *(f"**{s['total_us_per_pair']:.1f}**" for s in summary.values())])
    print(f"CPU us per pair, batches of {args.batch}, one runtime thread (the round of median total):\n")
    print(markdown_table(header, body))
    if args.stages:
        names = sorted({n for s in summary.values() for n in s["stages_us_per_pair"]})
        body = [[name, *(f"{s['stages_us_per_pair'].get(name, 0.0):.1f}" for s in summary.values())] for name in names]
        print("\nCPU us per pair by stage of predict (with the runtime calls each makes):\n")
        print(markdown_table(header, body))
    auto, full = summary["auto"]["total_us_per_pair"], summary[model.full_expert]["total_us_per_pair"]
    print(f"\nauto saves {1 - auto / full:.1%} of the pipeline's CPU per pair")
    write_result(
        args.out,
        {
            "figure": "the pipeline's CPU per pair, by component",
            "data": str(data),
            "batch": args.batch,
            "pairs": len(inputs),
            "runs": runs,
            "summary": summary,
            "auto_saves": 1 - auto / full,
        },
    )
    return 0


# The stages of DynamicPipeline.predict that --stages times: methods of the pipeline, of its attributor and of the
# batch execution (whose run() holds the experts' runtime calls, the lazy inputs and the attribution reruns).
PIPELINE_STAGES = (
    "encode_text",
    "encode_glimpse",
    "_route_by_point",
    "execution",
    "_wants",
    "_combine",
    "_calibrated_confidence",
    "_ood_pvalues",
    "_answers",
    "_attribution_madds",
)
EXECUTION_STAGES = ("run", "_make_lazy_inputs", "_attribute")


def time_stages(pipeline, stages: dict[str, float]) -> None:
    """Wrap the stages so that each call adds its thread CPU time to ``stages`` (nested stages count in both)."""
    from export import execution

    def timed(function, name):
        def wrapper(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                stages[name] += time.thread_time() - started

        return wrapper

    for name in PIPELINE_STAGES:
        setattr(pipeline, name, timed(getattr(pipeline, name), name))
    attribute = "attribute_all" if hasattr(pipeline.attributor, "attribute_all") else "attribute"
    setattr(pipeline.attributor, attribute, timed(getattr(pipeline.attributor, attribute), "attribution"))
    for name in EXECUTION_STAGES:  # on the class: each batch makes its own BatchExecution
        setattr(execution.BatchExecution, name, timed(getattr(execution.BatchExecution, name), f"execution.{name}"))


if __name__ == "__main__":
    raise SystemExit(main())
