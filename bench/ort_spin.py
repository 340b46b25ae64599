"""Why the ONNX backend turns off ONNX Runtime's thread spinning (export/backends.py).

Every component is its own ONNX Runtime session with its own intra-op thread pool, and by default those
threads spin for a while after each run. The pipeline calls several sessions back to back, so on a
2-core machine the spinning threads of one session take the cores the next session (or the server's
event loop) needs. This runs the in-process pipeline over the test split with spinning on (ONNX
Runtime's default, served until 2026-11-23) and off (served now), interleaved round by round, at the
serving batch size and with a batch of 1, for route=auto and the full expert forced.

    python -m bench.ort_spin [--rounds 7]
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

SPINNING = {"spinning (ORT default)": True, "no spinning (served)": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "ort_spin.json")
    args = parser.parse_args(argv)

    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from service.config import Settings

    settings = Settings(store=args.store)
    model = load_model(args.store, settings.model, settings.model_version)
    pipelines = {}
    for name, spin in SPINNING.items():
        backend = create_backend("onnx", "cpu", settings.threads)
        for pool in ("intra_op", "inter_op"):  # the backend turns spinning off; put the default back for A/B
            backend.options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
        pipelines[name] = DynamicPipeline(model, backend)
        pipelines[name].warmup(batch_sizes=(1, settings.max_batch_size))
    auto = decoded_inputs(pipelines["no spinning (served)"], load_test_split(args.data))
    full = model.full_expert
    routes = {"auto": auto, full: [dataclasses.replace(x, route=full) for x in auto]}
    cases = [(route, size) for route in routes for size in (settings.max_batch_size, 1)]

    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    seconds = {(name, route, size): [] for name in pipelines for route, size in cases}
    with CpuWatch() as watch:
        for round_index in range(args.rounds):
            order = list(pipelines) if round_index % 2 == 0 else list(reversed(pipelines))
            for route, size in cases:
                batches = chunks(routes[route], size)
                for name in order:
                    started = time.perf_counter()
                    for batch in batches:
                        pipelines[name].predict(batch)
                    seconds[(name, route, size)].append(time.perf_counter() - started)

    n = len(auto)
    rows, results = [], []
    for route, size in cases:
        base = statistics.median(seconds[("spinning (ORT default)", route, size)])
        for name in pipelines:
            median = statistics.median(seconds[(name, route, size)])
            results.append(
                {"config": name, "route": route, "batch_size": size, "seconds": spread(seconds[(name, route, size)])}
                | {"requests_per_second": n / median, "speedup_vs_spinning": base / median}
            )
            rows.append([route, size, name, f"{n / median:,.0f}", f"{base / median:.2f}"])
    print(markdown_table(["route", "batch", "ONNX Runtime threads", "req/s (median)", "× today"], rows))
    write_result(
        args.out,
        {
            "figure": "ONNX Runtime thread spinning, in process",
            "rounds": args.rounds,
            "samples": n,
            "foreign_cpu_share_before": quiet,
            "foreign_cpu_share": watch.foreign_share,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
