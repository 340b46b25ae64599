"""Figure 2b: realized savings over HTTP. A real ``dynfuse serve`` answers ``/v1/classify/batch`` calls of 32
test-split pairs with ``route=auto`` and with the full expert forced, the two alternating in rounds of the same
length within one run; time saved per sample over MAdds saved per sample.

Throughput comes from wrk (bench/wrk_classify.lua, at a small concurrency so the batcher stays fed), the MAdds
from the server's own counters (dynfuse_compute_madds_total over the predictions of each round), so both sides
of the ratio are measured, not computed. Beside it, the server's CPU seconds per pair (utime + stime of its
processes, /proc) give the same ratio in CPU time: on a busy machine, where the rates say more about the other
processes than about the server, that one still says what routing saved.

The server runs as ``dynfuse serve`` does by default, one worker process per core, with 4 batch calls in flight per
worker (``--workers 1`` measures one process: there the requests' Python, under one GIL, bounds the rate whatever the
model costs, so routing saves CPU but hardly any time). Each round records every worker's share of the server's CPU:
the kernel gives each of wrk's connections to one worker, and a round whose connections mostly went to one worker
says so.

The pairs are bench/peer_compare.py's held-out ones (the test split of ``dynfuse data synth --seed 7``, made when
missing: a fresh clone runs the command as it is), unless ``--data`` names another data set.

    python -m bench.http_savings [--rounds 6] [--seconds 8] [--workers N] [--concurrency C] [--data DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from bench.common import (
    DEFAULT_STORE,
    REPO,
    RESULTS,
    CpuWatch,
    chunks,
    cpu_seconds,
    load_test_split,
    markdown_table,
    server_processes,
    spread,
    start_server,
    stop_server,
    wait_for_quiet,
    worker_processes,
    write_result,
)

GOAL_RATIO = 0.5  # time saved per sample over MAdds saved per sample
BATCH = 32  # pairs per /v1/classify/batch call
HELD_OUT_SEED = 7  # bench/peer_compare.py's


def counters(base: str) -> dict[str, float]:
    """MAdds executed and predictions made so far, from the server's /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"madds": 0.0, "predictions": 0.0, "audits": 0.0, "audits_dropped": 0.0, "audit_madds": 0.0}
    for line in text.splitlines():
        if line.startswith("dynfuse_compute_madds_total{"):
            totals["madds"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dynfuse_route_decisions_total{"):
            totals["predictions"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dynfuse_audits_total{"):
            totals["audits_dropped" if 'outcome="dropped"' in line else "audits"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dynfuse_audit_madds_total{"):
            totals["audit_madds"] += float(line.rsplit(" ", 1)[1])
    return totals


def thread_cpu(pids: tuple[int, ...]) -> dict[str, float]:
    """CPU seconds of each thread of the server's processes so far, by thread id (/proc/<pid>/task/<tid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            out[f"{pid}/{task.name}"] = (int(stat[11]) + int(stat[12])) / ticks
    return out


def by_role(before: dict[str, float], after: dict[str, float], pids: tuple[int, ...]) -> dict[str, float]:
    """A round's CPU seconds by what the threads do: each process's main thread runs the event loop (the requests'
    Python: parsing, decoding, checks, rendering, metrics), its busiest other thread is the batch worker (the
    pipeline's Python and ONNX Runtime's calling thread), the rest are ONNX Runtime's pool threads and helpers."""
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    roles = {"event_loop": 0.0, "batch_worker": 0.0, "other_threads": 0.0}
    for pid in pids:
        mine = {tid: value for tid, value in spent.items() if tid.startswith(f"{pid}/")}
        roles["event_loop"] += mine.pop(f"{pid}/{pid}", 0.0)
        if mine:
            busiest = max(mine, key=mine.get)
            roles["batch_worker"] += mine.pop(busiest)
        roles["other_threads"] += sum(mine.values())
    return roles


def wrk(base: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    lua = REPO / "bench" / "wrk_classify.lua"
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(lua), base]
    env = {"DYNFUSE_BENCH_BODIES": str(bodies), "DYNFUSE_BENCH_PATH": "/v1/classify/batch", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    return json.loads(lines[-1][5:])


def one_round(base: str, bodies: Path, concurrency: int, seconds: float, server: int) -> dict:
    pids = server_processes(server)
    before, cpu_before, threads_before = counters(base), cpu_seconds(pids), thread_cpu(pids)
    workers = worker_processes(server) or [server]  # one process: the server itself
    by_worker_before = {pid: cpu_seconds((pid,)) for pid in workers}
    load = wrk(base, bodies, concurrency, seconds)
    after, cpu_after, threads_after = counters(base), cpu_seconds(pids), thread_cpu(pids)
    by_worker = {pid: cpu_seconds((pid,)) - by_worker_before[pid] for pid in workers}
    predictions = after["predictions"] - before["predictions"]
    errors = sum(load["errors"].values())
    samples = max(BATCH * load["requests"], 1)
    roles = by_role(threads_before, threads_after, pids)
    return {
        "samples_per_second": BATCH * load["requests"] / load["duration_s"],
        "madds_per_sample": (after["madds"] - before["madds"]) / max(predictions, 1),
        "predictions": predictions,
        "server_cpu_ms_per_sample": 1000 * (cpu_after - cpu_before) / samples,
        "server_cpu_ms_per_sample_by_thread": {role: 1000 * value / samples for role, value in roles.items()},
        # Shadow audits (DYNFUSE_AUDIT_RATE) of route auto's cheaper answers: the full path on one request, in the
        # batcher's spare time; their CPU is in the figures above, their MAdds are not (a counter of their own).
        "audits_per_sample": (after["audits"] - before["audits"]) / samples,
        "audits_dropped_per_sample": (after["audits_dropped"] - before["audits_dropped"]) / samples,
        "audit_madds_per_sample": (after["audit_madds"] - before["audit_madds"]) / samples,
        "errors": errors,
        "latency_ms": load["latency_ms"],
        # Each worker's share of the server's CPU in this round (the supervisor of several workers aside): about
        # equal shares when wrk's connections spread over the workers.
        "worker_cpu_shares": [round(value / (sum(by_worker.values()) or 1.0), 3) for value in by_worker.values()],
    }


def held_out_split(store: Path, data: Path | None) -> tuple[str, Path, list[dict]]:
    """The store's full expert, the data set (default: bench/peer_compare.py's held-out one, made when missing) and
    its test split."""
    from export.store import load_model

    if data is None:
        from bench.peer_compare import held_out_data

        data = held_out_data(store, None, HELD_OUT_SEED)
    return load_model(store).full_expert, data, load_test_split(data)


def write_batch_bodies(samples: list[dict], route: str, path: Path) -> int:
    """``/v1/classify/batch`` bodies of BATCH pairs each with ``route``, one per line of ``path`` (a short last batch
    is left out, so that every call costs the same); how many."""
    lines = [
        json.dumps(
            {
                "inputs": [
                    {"id": s["id"], "image": base64.b64encode(s["png"]).decode(), "text": s["text"]} for s in batch
                ],
                "route": route,
            }
        )  # fmt: skip
        for batch in chunks(samples, BATCH)
        if len(batch) == BATCH
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"data set (default: held-out, made with seed {HELD_OUT_SEED})")
    parser.add_argument("--rounds", type=int, default=6, help="A/B rounds (each policy once per round)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each policy's load in a round")
    parser.add_argument("--workers", type=int, default=0, help="dynfuse serve --workers (0, its default: one per core)")
    parser.add_argument("--concurrency", type=int, help="batch calls in flight (default: 4 per worker process)")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_savings.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    full, args.data, samples = held_out_split(args.store, args.data)
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-"))
    files = {route: work / f"{route}.jsonl" for route in ("auto", full)}
    for route, path in files.items():
        count = write_batch_bodies(samples, route, path)
    print(f"{count} batch bodies of {BATCH} test-split pairs per policy; full expert: {full}")

    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    process, base = start_server(args.store, work / "server.log", workers=args.workers)
    rounds = {"auto": [], full: []}
    try:
        workers = len(worker_processes(process.pid)) or 1
        if args.concurrency is None:
            args.concurrency = 4 * workers
        print(f"{workers} worker process(es), {args.concurrency} batch calls in flight")
        wrk(base, files["auto"], args.concurrency, 3)  # warm the HTTP path; not recorded
        with CpuWatch(server_processes(process.pid)) as watch:  # the workers are the server too
            for index in range(args.rounds):
                order = ["auto", full] if index % 2 == 0 else [full, "auto"]
                for route in order:
                    rounds[route].append(one_round(base, files[route], args.concurrency, args.seconds, process.pid))
    finally:
        stop_server(process)
        shutil.rmtree(work, ignore_errors=True)

    time_saved = [
        1.0 - f["samples_per_second"] / a["samples_per_second"]
        for a, f in zip(rounds["auto"], rounds[full], strict=True)
    ]
    madds_saved = 1.0 - statistics.median(r["madds_per_sample"] for r in rounds["auto"]) / statistics.median(
        r["madds_per_sample"] for r in rounds[full]
    )
    ratio = statistics.median(time_saved) / madds_saved
    cpu_saved = [
        1.0 - a["server_cpu_ms_per_sample"] / f["server_cpu_ms_per_sample"]
        for a, f in zip(rounds["auto"], rounds[full], strict=True)
    ]
    cpu_ratio = statistics.median(cpu_saved) / madds_saved
    rows = [
        [
            route,
            f"{statistics.median(r['samples_per_second'] for r in runs):,.0f}",
            f"{statistics.median(r['madds_per_sample'] for r in runs):,.0f}",
            f"{statistics.median(r['latency_ms']['p99'] for r in runs):.0f}",
            f"{statistics.median(r['server_cpu_ms_per_sample'] for r in runs):.3f}",
            sum(r["errors"] for r in runs),
        ]
        for route, runs in rounds.items()
    ]
    print(
        markdown_table(
            ["route", "samples/s (median)", "MAdds/sample", "p99 ms per call", "CPU ms/sample", "errors"], rows
        )
    )
    print(
        f"\nMAdds saved {madds_saved:.1%}, time saved {statistics.median(time_saved):.1%} "
        f"(rounds {min(time_saved):.1%}..{max(time_saved):.1%}): ratio {ratio:.2f} (goal >= {GOAL_RATIO}); "
        f"other processes used {watch.foreign_share:.0%} of the CPU"
    )
    print(f"in server CPU time: saved {statistics.median(cpu_saved):.1%} per sample, ratio {cpu_ratio:.2f}")
    for route, runs in rounds.items():
        roles = {
            role: statistics.median(r["server_cpu_ms_per_sample_by_thread"][role] for r in runs)
            for role in runs[0]["server_cpu_ms_per_sample_by_thread"]
        }
        audits = statistics.median(r["audits_per_sample"] for r in runs)
        print(
            f"{route}: CPU ms/sample by thread (medians) "
            + ", ".join(f"{role} {value:.3f}" for role, value in roles.items())
            + f"; audits run per sample {audits:.4f}"
        )
        if workers > 1:
            print(f"{route}: each round's smallest worker share of the CPU: " + ", ".join(
                f"{min(r['worker_cpu_shares']):.2f}" for r in runs))  # fmt: skip
    write_result(
        args.out,
        {
            "figure": "realized savings over HTTP",
            "full_expert": full,
            "data": str(args.data),
            "batch": BATCH,
            "workers": workers,
            "concurrency": args.concurrency,
            "seconds_per_round": args.seconds,
            "foreign_cpu_share_before": quiet,
            "foreign_cpu_share": watch.foreign_share,
            "rounds": rounds,
            "madds_saved": madds_saved,
            "time_saved": spread(time_saved),
            "time_saved_over_madds_saved": ratio,
            "cpu_saved": spread(cpu_saved),
            "cpu_saved_over_madds_saved": cpu_ratio,
            "loadavg": os.getloadavg(),
            "goal": {"ratio_at_least": GOAL_RATIO, "met": ratio >= GOAL_RATIO},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
