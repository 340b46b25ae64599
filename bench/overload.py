"""Figure 5: overload. Goodput (200s per second), refusals (503s per second) and the p99 latency of the
SERVED requests of a real ``dynfuse serve`` at concurrency 128, 512 and 1,024, in one run, with one
worker process and with ``--workers 2``.

Capacity is the goodput at the concurrency the server holds (c = 128: the default admission limit,
DYNFUSE_MAX_INFLIGHT = max_queue / 2); at 4x and 8x that concurrency the goodput should stay at 90% of
it or more, the rest refused cheaply. wrk (one thread) sends real test-split bodies with
bench/wrk_overload.lua, which counts answers by status and times the 200s alone; each level lasts
``--seconds`` after a short warm-up. The machine is shared: each level waits for a quiet machine, and is
measured again (up to 4 times) while other processes took more than 15% of the CPU; the quietest attempt
is reported, with the share other processes took, and every attempt is kept in the JSON.

    python -m bench.overload [--seconds 15] [--workers 1,2] [--levels 128,512,1024]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DEFAULT_STORE,
    REPO,
    RESULTS,
    CpuWatch,
    cpu_seconds,
    load_test_split,
    markdown_table,
    server_processes,
    start_server,
    stop_server,
    wait_for_quiet,
    write_result,
)

GOAL = 0.90  # goodput at 4x and 8x the held concurrency, over capacity
LEVELS = (128, 512, 1024)
NOISY = 0.15  # a level during which other processes took more of the CPU than this is measured again
ATTEMPTS = 4  # at most, per level; the quietest attempt is kept


def rejected(base: str) -> float:
    """dynfuse_rejected_requests_total{reason="over_capacity"} summed over the workers."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dynfuse_rejected_requests_total{") and 'reason="over_capacity"' in line
    )


def run_level(base: str, bodies: Path, concurrency: int, seconds: float, server: tuple[int, ...]) -> dict:
    lua = REPO / "bench" / "wrk_overload.lua"
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(lua)]
    command.append(f"{base}/v1/classify")
    env = {**os.environ, "DYNFUSE_BENCH_BODIES": str(bodies)}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = cpu_seconds(server)
    refused_before = rejected(base)
    with CpuWatch(server) as watch:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    result = json.loads(lines[-1][5:])
    wall = result["duration_s"]
    statuses = result["statuses"]
    return result | {
        "concurrency": concurrency,
        "goodput_per_s": statuses.get("200", 0) / wall,
        "refused_per_s": statuses.get("503", 0) / wall,
        "other_statuses": {k: v for k, v in statuses.items() if k not in ("200", "503")},
        "server_counted_refusals": rejected(base) - refused_before,
        "server_cpu_cores": (cpu_seconds(server) - server_cpu) / wall,
        "wrk_cpu_cores": (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / wall,
        "foreign_cpu_share": watch.foreign_share,
    }


def quietest(base: str, bodies: Path, concurrency: int, seconds: float, server: tuple[int, ...], max_wait: float):
    """The level measured when the machine is quiet: again (after waiting for quiet) while other processes
    took more than ``NOISY`` of the CPU, at most ``ATTEMPTS`` times; the quietest attempt, with all of them."""
    attempts = []
    for _ in range(ATTEMPTS):
        wait_for_quiet(max_wait_s=max_wait)
        attempts.append(run_level(base, bodies, concurrency, seconds, server))
        if attempts[-1]["foreign_cpu_share"] <= NOISY:
            break
    best = min(attempts, key=lambda row: row["foreign_cpu_share"])
    return best | {"attempts": [{k: a[k] for k in ("goodput_per_s", "foreign_cpu_share")} for a in attempts]}


def measure(
    store: Path, bodies: Path, workers: int, levels: tuple[int, ...], seconds: float, work: Path, max_wait: float
) -> dict:
    process, base = start_server(store, work / f"server-{workers}.log", workers)
    try:
        time.sleep(2.0)
        server = server_processes(process.pid)
        run_level(base, bodies, 8, 3, server)  # warm the HTTP path; not recorded
        rows = []
        for concurrency in levels:
            row = quietest(base, bodies, concurrency, seconds, server, max_wait)
            rows.append(row)
            print(
                f"workers={workers} c={concurrency}: {row['goodput_per_s']:,.0f} served/s, "
                f"{row['refused_per_s']:,.0f} refused/s, p99 served {row['served_latency_ms']['p99']:.0f} ms, "
                f"other processes {row['foreign_cpu_share']:.0%}"
            )
    finally:
        stop_server(process)
    capacity = rows[0]["goodput_per_s"]
    for row in rows:
        row["of_capacity"] = row["goodput_per_s"] / capacity
    return {"workers": workers, "capacity_per_s": capacity, "capacity_at": levels[0], "levels": rows}


def table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        for level in run["levels"]:
            rows.append(
                [
                    run["workers"],
                    level["concurrency"],
                    f"{level['goodput_per_s']:,.0f}",
                    f"**{level['of_capacity']:.0%}**",
                    f"{level['refused_per_s']:,.0f}",
                    f"{level['served_latency_ms']['p50']:.0f}",
                    f"{level['served_latency_ms']['p99']:.0f}",
                    sum(level["other_statuses"].values()) + sum(level["errors"].values()) - level["errors"]["status"],
                    f"{level['server_cpu_cores']:.2f}",
                    f"{level['wrk_cpu_cores']:.2f}",
                    f"{level['foreign_cpu_share']:.0%}",
                ]
            )
    header = ["workers", "c", "served/s", "of capacity", "refused/s (503)", "p50 served ms", "p99 served ms"]
    header += ["other answers or errors", "server CPU (cores)", "wrk CPU", "other processes' CPU"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each level")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrencies; the first is capacity")
    parser.add_argument("--workers", default="1,2", help="dynfuse serve --workers values to measure")
    parser.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("bench.overload needs wrk (apt-get install wrk)")
    levels = tuple(int(v) for v in args.levels.split(","))
    samples = load_test_split(args.data)
    work = Path(tempfile.mkdtemp(prefix="dynfuse-overload-"))
    bodies = work / "bodies.jsonl"
    lines = [json.dumps({"image": base64.b64encode(s["png"]).decode(), "text": s["text"]}) for s in samples]
    bodies.write_text("\n".join(lines) + "\n")
    runs = []
    for workers in (int(v) for v in args.workers.split(",")):
        runs.append(measure(args.store, bodies, workers, levels, args.seconds, work, args.max_wait))
    goal = {
        "goodput_of_capacity_at_least": GOAL,
        "met": all(level["of_capacity"] >= GOAL for run in runs for level in run["levels"]),
    }
    print("\n" + table(runs))
    write_result(args.out, {"figure": "overload", "levels": levels, "runs": runs, "goal": goal})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
