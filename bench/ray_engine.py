"""The Ray engine against the single process, side by side on one machine: ``dynfuse serve --workers 1`` and
``dynfuse serve --engine ray`` with its defaults (nothing but the store and the port), the same test-split bodies,
the same load generator and concurrency levels, one after the other. For the Ray engine also: the time to ready from the
command's start, an expert replica killed under load (what its requests and the others' got, and when its
requests were answered again), and the time SIGTERM takes to stop it with every process of its cluster.

The machine's load average and the CPU share of other processes go into every figure: on a shared machine the
figures are contended, and say so.

    python -m bench.ray_engine [--store store] [--seconds 15] [--levels 8,32] [--out bench/results/ray_engine.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DEFAULT_STORE,
    REPO,
    RESULTS,
    free_port,
    load_test_split,
    markdown_table,
    percentile,
    proc_status,
    server_processes,
    start_server,
    stop_server,
    write_result,
)
from bench.http_load import run_load

KILLED_EXPERT = "image_lite"  # takes part of the default model's traffic; its replica is killed under load
BYSTANDER_EXPERT = "text"


def machine_state() -> dict:
    return {"loadavg": [round(v, 2) for v in os.getloadavg()]}


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (the Ray command's, inherited by every Ray process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def descendants(pid: int) -> tuple[int, ...]:
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p in server_processes(parent)[1:] if p not in found]
        found += children
        todo += children
    return tuple(found)


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_ray(store: Path, log: Path, timeout_s: float) -> tuple[subprocess.Popen, str, str, float]:
    """``dynfuse serve --engine ray`` with its defaults: (process, base URL, its mark, seconds to ready)."""
    mark = uuid.uuid4().hex
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--engine", "ray", "--store", str(store)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "DYNFUSE_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1", "BENCH_PROCESS_MARK": mark}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    while not ready(base):
        if process.poll() is not None:
            stop_ray(process, mark)  # whatever of its cluster is left
            raise RuntimeError(f"dynfuse serve --engine ray exited {process.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() - started > timeout_s:
            stop_ray(process, mark)
            raise RuntimeError(f"not ready after {timeout_s} s: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, base, mark, time.monotonic() - started


def sizing_line(log: Path) -> str:
    return next((line.split("deployments: ", 1)[1].strip() for line in log.read_text().splitlines()
                 if "deployments: ingress:" in line), "")  # fmt: skip


def kill_an_expert_replica(base: str, sample: dict, seconds_after: float) -> dict:
    """Two clients forced to KILLED_EXPERT and two to BYSTANDER_EXPERT; SIGKILL the killed expert's replica after
    5 s; what each got, and when a request sent after the kill was first answered again."""
    import httpx

    pair = {"image": base64.b64encode(sample["png"]).decode(), "text": sample["text"]}
    answers: dict[str, list[tuple[float, object, float]]] = {KILLED_EXPERT: [], BYSTANDER_EXPERT: []}
    stop = threading.Event()

    def client(route: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status = http.post("/v1/classify", json={**pair, "route": route}).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                answers[route].append((sent, status, time.monotonic() - sent))

    threads = [threading.Thread(target=client, args=(r,)) for r in (KILLED_EXPERT, BYSTANDER_EXPERT) * 2]
    for thread in threads:
        thread.start()
    time.sleep(5)
    deadline = time.monotonic() + 30  # a replica being replaced (a failed health check) has no process a moment
    while True:
        victims = [pid for pid in all_pids() if f".{KILLED_EXPERT}:expert_{KILLED_EXPERT}" in cmdline(pid)]
        if victims or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not victims:
        stop.set()
        replicas = [cmdline(pid).strip() for pid in all_pids() if "ServeReplica" in cmdline(pid)]
        raise RuntimeError(f"no replica of expert {KILLED_EXPERT} found among {replicas}")
    killed_at = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    time.sleep(seconds_after)
    stop.set()
    for thread in threads:
        thread.join(90)
    result = {"killed_pids": victims}
    for route, rows in answers.items():
        before = [r for r in rows if r[0] + r[2] < killed_at]
        after = [r for r in rows if r[0] + r[2] >= killed_at]
        statuses: dict[str, int] = {}
        for _, status, _ in after:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        answered_again = [sent + took for sent, status, took in after if status == 200 and sent > killed_at]
        result[route] = {
            "answers_before_kill": len(before),
            "p50_ms_before": round(1000 * percentile([t for _, _, t in before], 50), 1),
            "statuses_after_kill": statuses,
            "in_flight_at_kill": sum(1 for s, _, t in rows if s < killed_at < s + t),
            "slowest_after_kill_s": round(max((t for _, _, t in after), default=0.0), 2),
            "first_answered_request_sent_after_kill_s": round(min(answered_again) - killed_at, 2)
            if answered_again
            else None,
        }
    return result


def all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode(errors="replace")
    except OSError:
        return ""


def stop_ray(process: subprocess.Popen, mark: str) -> dict:
    """SIGTERM, and how it went: seconds to exit, exit code, processes of its cluster left (killed after)."""
    signalled = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    seconds = time.monotonic() - signalled
    time.sleep(0.5)
    left = marked(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return {"seconds": round(seconds, 2), "exit_code": process.returncode, "processes_left": len(left)}


def measure_levels(url: str, bodies: Path, levels: list[int], seconds: float, server: tuple[int, ...], generator: str):
    run_load(generator, url, bodies, 8, 3, server)  # warm the HTTP path; not recorded
    rows = []
    for concurrency in levels:
        level = run_load(generator, url, bodies, concurrency, seconds, server)
        level["machine_state_after"] = machine_state()
        rows.append(level)
        print(f"  c={concurrency}: {level['requests_per_second']:,.0f} req/s, p99 {level['latency_ms']['p99']:.1f} ms")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load level")
    parser.add_argument("--levels", default="8,32", help="client concurrencies")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_engine.json")
    args = parser.parse_args(argv)
    generator = args.generator if args.generator != "auto" else ("wrk" if shutil.which("wrk") else "python")
    levels = [int(v) for v in args.levels.split(",")]
    samples = load_test_split(args.data)
    bodies = [json.dumps({"image": base64.b64encode(s["png"]).decode(), "text": s["text"]}).encode() for s in samples]
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-ray-"))  # the servers' logs: kept when a step fails
    try:
        measure(args, generator, levels, samples, bodies, work)
    except BaseException:
        print(f"the servers' logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(args, generator: str, levels: list[int], samples: list[dict], bodies: list[bytes], work: Path) -> None:
    bodies_file = work / "bodies.jsonl"
    bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
    result: dict = {"generator": generator, "levels": levels, "seconds_per_level": args.seconds}

    print("single process (dynfuse serve --workers 1)")
    state = machine_state()
    process, base = start_server(args.store, work / "single.log")
    try:
        server = server_processes(process.pid)
        rows = measure_levels(f"{base}/v1/classify", bodies_file, levels, args.seconds, server, generator)
        result["single_process"] = {"machine_state_before": state, "load": rows, "memory_mib": proc_status(server)}
    finally:
        stop_server(process)

    print("Ray engine (dynfuse serve --engine ray)")
    state = machine_state()
    process, base, mark, ready_s = start_ray(args.store, work / "ray.log", args.ready_timeout)
    print(f"  ready in {ready_s:.1f} s")
    ray_result = {
        "machine_state_before": state,
        "ready_seconds": round(ready_s, 1),
        "machine_state_when_ready": machine_state(),
        "deployments": sizing_line(work / "ray.log"),
    }
    try:
        server = descendants(process.pid)
        ray_result["processes"] = len(server)
        ray_result["load"] = measure_levels(f"{base}/v1/classify", bodies_file, levels, args.seconds, server, generator)
        ray_result["memory_mib"] = proc_status(tuple(p for p in server if Path(f"/proc/{p}").exists()))
        print(f"  killing the replica of expert {KILLED_EXPERT} under load")
        ray_result["replica_kill"] = kill_an_expert_replica(base, samples[0], seconds_after=30)
        print(f"  {ray_result['replica_kill']}")
    finally:
        ray_result["stop"] = stop_ray(process, mark)
    print(f"  stopped in {ray_result['stop']['seconds']} s, {ray_result['stop']['processes_left']} processes left")
    result["ray"] = ray_result
    result["summary"] = markdown_table(
        ["engine", *(f"c={c} req/s" for c in levels), *(f"c={c} p99 ms" for c in levels)],
        [
            [
                name,
                *(f"{r['requests_per_second']:,.0f}" for r in rows),
                *(f"{r['latency_ms']['p99']:.0f}" for r in rows),
            ]
            for name, rows in (("single process", result["single_process"]["load"]), ("Ray", ray_result["load"]))
        ],
    )
    print(result["summary"])
    write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
