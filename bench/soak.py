"""Soak and chaos: mixed traffic against ``dynfuse serve --workers 2``, then one worker killed under load.

The traffic mixes, with fixed weights and a seeded choice: good requests (JSON, multipart, text only,
a big palette image, batch calls, /v2), bad ones (invalid base64, not an image, a fuzzed image, a
TIFF, truncated, malformed JSON, a wrong content type), oversized bodies, clients that disconnect
mid-body or before the answer, and clients that send half a body and stall. Every answer must be a
2xx or 4xx: a 5xx (or a hang, which the client's timeout turns into an error) fails the run.

Phases: warm-up (not measured; every pool and cache reaches its size), then the soak, with the
resident memory, open file descriptors and threads of every server process recorded before and
after; then chaos: traffic again, one worker killed with SIGKILL in the middle, and the replacement
awaited. Expected: 0 x 5xx, RSS growth < 10%, no more file descriptors or threads at the end than at
the start, the killed worker replaced while the other keeps serving, and no request hanging.

    python -m bench.soak                  # 10 minutes of soak -> bench/results/soak.json
    python -m bench.soak --minutes 1      # what the CI test runs, shorter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench import common
from bench.common import DEFAULT_DATA, DEFAULT_STORE, RESULTS, load_test_split, write_result
from bench.soak_traffic import MAX_BODY_BYTES, Tally, Traffic, drive, prime

REQUEST_TIMEOUT_S = 4.0  # the stalled clients get their 408 after this


# -- the server's processes ---------------------------------------------------------------------------
# Threads a process may add over the soak without leaking: the decode pool and asyncio's default executor start
# their threads lazily, up to a fixed bound, when concurrency first needs them (seen: a worker at 11 threads after
# warm-up and 12 at the end). A leak grows with traffic: the soak's thousands of requests and connections.
THREAD_SLACK = 2


def process_stats(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


def snapshot(supervisor: int) -> dict:
    pids = [supervisor, *common.worker_processes(supervisor)]
    return {str(pid): process_stats(pid) for pid in pids}


def settled_snapshot(supervisor: int, start: dict, wait_s: float = 20.0) -> dict:
    """The end snapshot, once in-flight connections have closed and idle threads have exited (bounded)."""
    deadline = time.monotonic() + wait_s
    while True:
        now = snapshot(supervisor)
        settled = all(
            pid in now and now[pid]["fds"] <= start[pid]["fds"] and now[pid]["threads"] <= start[pid]["threads"]
            for pid in start
        )
        if settled or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def compare(start: dict, end: dict) -> dict:
    rows = {}
    for pid, before in start.items():
        after = end.get(pid)
        if after is None:
            rows[pid] = {"start": before, "end": None}
            continue
        rows[pid] = {
            "start": before,
            "end": after,
            "rss_growth": round(after["rss_mib"] / before["rss_mib"] - 1, 4),
            "fds_added": after["fds"] - before["fds"],
            "threads_added": after["threads"] - before["threads"],
        }
    total_start = sum(v["rss_mib"] for v in start.values())
    total_end = sum(v["rss_mib"] for pid, v in end.items() if pid in start)
    return {"processes": rows, "total_rss_mib": {"start": total_start, "end": total_end}}


# -- a run ----------------------------------------------------------------------------------------
def start_server(store: Path, log: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """bench.common's server with the soak's limits, returned once every worker is up (``/readyz`` answers
    from the first one)."""
    settings = {"max_body_bytes": MAX_BODY_BYTES, "request_timeout_s": REQUEST_TIMEOUT_S}
    process, base = common.start_server(store, log, workers, settings)
    deadline = time.monotonic() + 120
    while len(common.worker_processes(process.pid)) != workers:
        if time.monotonic() > deadline:
            common.stop_server(process)
            raise RuntimeError(f"dynfuse serve did not start {workers} workers in 120 s")
        time.sleep(0.2)
    return process, base


def run(
    store: Path,
    samples: list[dict],
    *,
    soak_s: float,
    warmup_s: float = 20.0,
    chaos_s: float = 20.0,
    workers: int = 2,
    seed: int = 0,
    log: Path | None = None,
    progress=print,
) -> dict:
    log = log or Path(f"/tmp/dynfuse-soak-{os.getpid()}.log")
    model = store_model_name(store)
    process, base = start_server(store, log, workers)
    result: dict = {"workers": workers, "phases_s": {"warmup": warmup_s, "soak": soak_s, "chaos": chaos_s}}
    try:
        traffic = Traffic(base, model, samples, seed)
        progress(f"warm-up {warmup_s:g} s")
        warm_up(process.pid, traffic, warmup_s)
        time.sleep(2.0)
        start = snapshot(process.pid)
        progress(f"soak {soak_s:g} s")
        soak = Tally()
        asyncio.run(drive(traffic, soak_s, soak))
        end = settled_snapshot(process.pid, start)
        result["soak"] = soak.as_dict() | {"requests_per_second": sum(soak.kinds.values()) / soak_s}
        result["resources"] = compare(start, end)
        progress(f"chaos {chaos_s:g} s: one worker killed at {chaos_s / 3:.0f} s")
        result["chaos"] = chaos(process.pid, traffic, chaos_s)
        process.send_signal(signal.SIGTERM)
        result["exit_code"] = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    server_log = log.read_text()
    result["server_log"] = {
        "unhandled_errors": server_log.count("unhandled error"),
        "tracebacks": server_log.count("Traceback"),
        "lines": len(server_log.splitlines()),
    }
    result["verdict"] = verdict(result)
    return result


def warm_up(supervisor: int, traffic: Traffic, seconds: float, rounds: int = 6) -> None:
    """Prime every kind until every worker has started the same threads (its decode pool included), then
    ``seconds`` of the mix."""
    for _ in range(rounds):
        asyncio.run(prime(traffic))
        threads = {process_stats(pid)["threads"] for pid in common.worker_processes(supervisor)}
        if len(threads) == 1:
            break
    asyncio.run(drive(traffic, seconds, Tally()))


def chaos(supervisor: int, traffic: Traffic, seconds: float) -> dict:
    before = common.worker_processes(supervisor)
    victim = before[0]
    tally = Tally()
    kill_at = seconds / 3

    async def scenario():
        async def killer():
            await asyncio.sleep(kill_at)
            os.kill(victim, signal.SIGKILL)

        await asyncio.gather(drive(traffic, seconds, tally), killer())

    asyncio.run(scenario())
    deadline = time.monotonic() + 60
    after = common.worker_processes(supervisor)
    while (len(after) < len(before) or victim in after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = common.worker_processes(supervisor)
    survivor = [pid for pid in before if pid != victim]
    return tally.as_dict() | {
        "killed": victim,
        "workers_before": before,
        "workers_after": after,
        "replaced": len(after) == len(before) and victim not in after,
        "survivor_kept_serving": all(pid in after for pid in survivor) and tally.statuses["200"] > 0,
    }


def verdict(result: dict) -> dict:
    soak, chaos_phase, resources = result["soak"], result["chaos"], result["resources"]
    growth = {pid: row.get("rss_growth") for pid, row in resources["processes"].items()}
    checks = {
        "no_5xx": soak["server_errors_5xx"] == 0 and chaos_phase["server_errors_5xx"] == 0,
        "no_client_errors_in_soak": not soak["client_errors"],
        "rss_growth_under_10_percent": all(g is not None and g < 0.10 for g in growth.values()),
        "no_leaked_fds": all(row.get("fds_added", 1) <= 0 for row in resources["processes"].values()),
        "no_leaked_threads": all(
            row.get("threads_added", THREAD_SLACK + 1) <= THREAD_SLACK for row in resources["processes"].values()
        ),
        "killed_worker_replaced": chaos_phase["replaced"],
        "survivor_kept_serving": chaos_phase["survivor_kept_serving"],
        # Only the killed worker's own connections may fail, and none may hang (a timeout).
        "no_request_hung": "ReadTimeout" not in chaos_phase["client_errors"]
        and "TimeoutError" not in chaos_phase["client_errors"],
        "clean_exit": result["exit_code"] == 0 and result["server_log"]["unhandled_errors"] == 0,
    }
    return checks | {"passed": all(checks.values())}


def store_model_name(store: Path) -> str:
    from export.store import resolve

    return resolve(store).parent.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak phase")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of warm-up traffic")
    parser.add_argument("--chaos", type=float, default=30.0, help="seconds of the chaos phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    samples = load_test_split(args.data)[:300]
    result = run(args.store, samples, soak_s=60 * args.minutes, warmup_s=args.warmup, chaos_s=args.chaos)
    print(json.dumps({k: result[k] for k in ("soak", "resources", "verdict")}, indent=1))
    write_result(args.out, {"figure": "soak and chaos", **result})
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
