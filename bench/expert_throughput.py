"""What one replica of each Ray deployment serves: rows per second and batch time, per batch size.

For every expert, its deployment's work alone (``ExpertWorker.run``: its chain's components on a sub-batch);
for the ingress, the shared encoders and the router on a batch (what ``RemoteExpertsPipeline`` runs before it
hands the sub-batches out; HTTP, decoding and Serve's own cost per request are not in it); and for the static
full model, the whole pipeline with every request forced to the full expert (one block, as ``dynfuse serve``
would scale it). One runtime thread, as a replica reserving one CPU gets. Inputs are random tensors of the
right shapes: an expert's time does not depend on its inputs' values. ``dynfuse plan`` reads the result.

    python -m bench.expert_throughput [--store store] [--batch-sizes 1,4,16] [--seconds 1.0]
        [--out bench/results/expert_throughput.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_STORE, RESULTS, CpuWatch, write_result
from export.backends import create_backend
from export.pipeline import DynamicPipeline, PipelineInput
from export.store import load_model
from service.ray.experts import ExpertWorker, _random

DEFAULT_OUT = RESULTS / "expert_throughput.json"


def timed(run, seconds: float, min_rounds: int = 5) -> float:
    """Median seconds of one ``run()`` over at least ``seconds`` of repeats (after one warm-up call)."""
    run()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_rounds or time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(store: Path, model_name: str | None, batch_sizes: list[int], seconds: float) -> dict:
    model = load_model(store, model_name, None)
    backend = create_backend("onnx", "cpu", 1)
    rng = np.random.default_rng(0)
    pipeline = DynamicPipeline(model, backend)
    side = model.preprocessing.image_size

    def requests(n: int, route: str) -> list[PipelineInput]:
        return [
            PipelineInput(
                token_ids=_random(model, "token_ids", 1, rng)[0],
                image=rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
                route=route,
            )
            for _ in range(n)
        ]

    def ingress(n: int):
        batch = requests(n, "auto")
        tokens = np.stack([x.token_ids for x in batch])
        pixels = np.stack([x.image for x in batch])
        present = np.ones(n, bool)

        def run():
            text = pipeline.encode_text(tokens)
            glimpse = pipeline.encode_glimpse(pixels)
            pipeline.route(text["text_features"], glimpse, present, present)

        return run

    def expert(name: str, n: int):
        worker = ExpertWorker(model, backend, name)
        tensors = {input_name: _random(model, input_name, n, rng) for input_name in worker.inputs}
        return lambda: worker.run(tensors)

    def full(n: int):
        batch = requests(n, model.full_expert)
        return lambda: pipeline.predict(batch)

    def table(make) -> dict:
        out = {}
        for n in batch_sizes:
            batch_seconds = timed(make(n), seconds)
            out[str(n)] = {"batch_ms": round(1000 * batch_seconds, 3), "rows_per_s": round(n / batch_seconds, 1)}
        return out

    return {
        "model": model.name,
        "version": model.version,
        "backend": backend.describe(),
        "threads": 1,
        "full_expert": model.full_expert,
        "batch_sizes": batch_sizes,
        "ingress": table(ingress),
        "experts": {name: table(lambda n, name=name: expert(name, n)) for name in model.expert_names},
        "static_full": table(full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per expert and batch size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    load_before = os.getloadavg()
    with CpuWatch() as watch:
        result = measure(args.store, args.model, sizes, args.seconds)
    # Timings on a shared machine: how busy it was, so a reader can tell a quiet reading from a contended one.
    result["machine_state"] = {
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "other_processes_cpu_share": None if watch.foreign_share is None else round(watch.foreign_share, 3),
    }
    tables = [("ingress", result["ingress"]), *result["experts"].items(), ("static_full", result["static_full"])]
    for name, rows in tables:
        cells = [f"b{n} {row['rows_per_s']:>8.0f}/s ({row['batch_ms']} ms)" for n, row in rows.items()]
        print(f"{name:>12}: " + "  ".join(cells))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
