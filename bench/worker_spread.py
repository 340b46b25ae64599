"""Do a client's connections reach every worker? ``dynfuse serve`` with its default workers (one per core), then
``--trials`` short wrk runs of ``/v1/classify/batch`` calls (32 held-out pairs each, the full expert forced so that
every call costs the same), each run opening its ``-c`` keep-alive connections at once, as a load generator or a
proxy's upstream pool does. Each trial records every worker's share of the server's CPU and the pairs answered per
second: a trial whose connections all went to one worker shows one share near 1 and about half the rate.

``--baseline DIR`` then runs another checkout (``git worktree add DIR <commit>``) the same way, in the same Python
environment, to compare how each spreads connections (service/listeners.py: one socket per worker against uvicorn's
one shared socket).

    python -m bench.worker_spread [--trials 10] [--connections 4,8] [--seconds 4] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_STORE,
    REPO,
    RESULTS,
    cpu_seconds,
    free_port,
    stop_server,
    worker_processes,
    write_result,
)
from bench.http_savings import BATCH, HELD_OUT_SEED, held_out_split, write_batch_bodies, wrk


def start(root: Path, store: Path, log: Path) -> tuple[subprocess.Popen, str, tuple[int, ...]]:
    """``dynfuse serve`` from checkout ``root`` with its defaults; returned once every worker has warmed its model
    and listens (ready means one of them does): (process, base URL, worker pids)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "DYNFUSE_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(store), "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dynfuse serve exited {process.returncode}: {log.read_text()[-2000:]}")
        workers = worker_processes(process.pid)
        if len(workers) > 1 and log.read_text().count("Application startup complete.") == len(workers):
            time.sleep(0.5)  # from the end of startup to listening
            return process, f"http://127.0.0.1:{port}", workers
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError("dynfuse serve did not warm several workers in 180 s")


def trial(base: str, bodies: Path, connections: int, seconds: float, workers: tuple[int, ...]) -> dict:
    before = {pid: cpu_seconds((pid,)) for pid in workers}
    load = wrk(base, bodies, connections, seconds)
    spent = {pid: cpu_seconds((pid,)) - before[pid] for pid in workers}
    total = sum(spent.values()) or 1.0
    return {
        "pairs_per_second": BATCH * load["requests"] / load["duration_s"],
        "worker_cpu_shares": sorted(round(value / total, 3) for value in spent.values()),
        "errors": sum(load["errors"].values()),
    }


def summarize(name: str, trials: list[dict]) -> dict:
    largest = [max(t["worker_cpu_shares"]) for t in trials]
    one_sided = sum(share >= 0.9 for share in largest)
    rates = [t["pairs_per_second"] for t in trials]
    print(
        f"{name}: {one_sided} of {len(trials)} trials with one worker doing >= 90% of the work; pairs/s median "
        f"{statistics.median(rates):,.0f} (min {min(rates):,.0f}, max {max(rates):,.0f})"
    )
    return {
        "trials": trials,
        "one_worker_did_90_percent": one_sided,
        "pairs_per_second": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"data set (default: held-out, made with seed {HELD_OUT_SEED})")
    parser.add_argument("--trials", type=int, default=10, help="wrk runs per server and connection count")
    parser.add_argument("--connections", default="4,8", help="comma-separated wrk -c values")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each trial")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (git worktree add DIR REV)")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker_spread.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    full, args.data, samples = held_out_split(args.store, args.data)
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-"))
    bodies = work / "bodies.jsonl"
    write_batch_bodies(samples, full, bodies)  # the full expert forced: every call costs the same
    checkouts = {"this checkout": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    counts = [int(c) for c in args.connections.split(",")]
    results: dict = {name: {str(c): [] for c in counts} for name in checkouts}
    worker_counts = {}
    try:
        for name, root in checkouts.items():
            process, base, workers = start(root, args.store.resolve(), work / "server.log")
            worker_counts[name] = len(workers)
            try:
                wrk(base, bodies, max(counts), 3)  # warm the HTTP path; not recorded
                for connections in counts:
                    for _ in range(args.trials):
                        results[name][str(connections)].append(trial(base, bodies, connections, args.seconds, workers))
            finally:
                stop_server(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        name: {c: summarize(f"{name}, -c{c}", trials) for c, trials in by_count.items()}
        for name, by_count in results.items()
    }
    write_result(
        args.out,
        {
            "figure": "connections spread over the workers",
            "full_expert": full,
            "data": str(args.data),
            "batch": BATCH,
            "seconds_per_trial": args.seconds,
            "workers": worker_counts,
            "baseline": str(args.baseline) if args.baseline else None,
            "loadavg": os.getloadavg(),
            "results": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
