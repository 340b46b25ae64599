"""How long ``dynfuse serve --engine ray`` (its defaults: nothing but the store and the port) takes to stop on a
signal at each stage of its start and once ready, and what it leaves: seconds from the signal to the command's
exit, its exit code, and the processes of its cluster still alive half a second later (any is a failure; they
are killed after). Also its time to ready, from each run that got there.

The stages: ``ray-init`` (the cluster's first process, the GCS, is up and ray.init is starting the others),
``ray-started`` (ray.init returned), ``serve-starting`` (the deployments are sized and placed; Serve's controller
and proxy are starting), ``loading`` (``/readyz`` answers 503: the ingress deploys the experts and warms the
model), ``ready`` (``/readyz`` 200, a few requests answered, one in flight when the signal comes).

    python -m bench.ray_stop [--store store] [--repeats 2] [--out bench/results/ray_stop.json]
"""

from __future__ import annotations

import argparse
import os
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

from bench.common import DEFAULT_STORE, REPO, RESULTS, free_port, markdown_table, spread, write_result
from bench.ray_engine import machine_state, marked

STAGES = ("ray-init", "ray-started", "serve-starting", "loading", "ready")
STAGE_TIMEOUT_S = 600.0
SETTLE_S = 0.5  # the exit status of a process killed last reaches /proc a moment after


def readyz(base: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def classify_forever(base: str, stop: threading.Event) -> None:
    """One client sending text-only requests until told to stop (so a request is in flight at the signal)."""
    body = b'{"text": "a red circle"}'
    while not stop.is_set():
        request = urllib.request.Request(f"{base}/v1/classify", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError:
            time.sleep(0.05)


def one_stop(store: Path, stage: str, signum: int, log: Path) -> dict:
    mark = uuid.uuid4().hex
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "serve", "--engine", "ray", "--store", str(store)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_PROCESS_MARK": mark}
    state = machine_state()
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    reached = {
        "ray-init": lambda: any("gcs_server" in cmdline(pid) for pid in marked(mark)),
        "ray-started": lambda: "Started a local Ray instance" in log.read_text(),
        "serve-starting": lambda: "dynfuse: deployments:" in log.read_text(),
        "loading": lambda: readyz(base) == 503,
        "ready": lambda: readyz(base) == 200,
    }[stage]
    client_stop = threading.Event()
    try:
        while not reached():
            if process.poll() is not None:
                raise RuntimeError(f"exited {process.returncode} before {stage}: {log.read_text()[-2000:]}")
            if time.monotonic() - started > STAGE_TIMEOUT_S:
                raise RuntimeError(f"{stage} not reached within {STAGE_TIMEOUT_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        stage_s = time.monotonic() - started
        if stage == "ready":
            client = threading.Thread(target=classify_forever, args=(base, client_stop), daemon=True)
            client.start()
            time.sleep(2.0)  # the client's requests are being answered
        signalled = time.monotonic()
        process.send_signal(signum)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        seconds = time.monotonic() - signalled
    finally:
        client_stop.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    time.sleep(SETTLE_S)
    left = marked(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return {
        "stage": stage,
        "signal": signal.Signals(signum).name,
        "stage_reached_s": round(stage_s, 1),
        "stop_seconds": round(seconds, 2),
        "exit_code": process.returncode,
        "processes_left": len(left),
        "machine_state_before": state,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each stage, SIGTERM and SIGINT alternating")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_stop.json")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose among {', '.join(STAGES)}")
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-ray-stop-"))
    runs = []
    for repeat in range(args.repeats):
        for stage in stages:
            signum = signal.SIGTERM if repeat % 2 == 0 else signal.SIGINT
            run = one_stop(args.store, stage, signum, work / f"{stage}-{repeat}.log")
            print(
                f"{stage} ({run['signal']}): stopped in {run['stop_seconds']} s, exit {run['exit_code']}, "
                f"{run['processes_left']} processes left (stage reached at {run['stage_reached_s']} s, "
                f"load {run['machine_state_before']['loadavg']})",
                flush=True,
            )
            runs.append(run)
    rows = []
    for stage in stages:
        of_stage = [r for r in runs if r["stage"] == stage]
        rows.append(
            [
                stage,
                len(of_stage),
                f"{max(r['stop_seconds'] for r in of_stage):.1f}",
                f"{min(r['stop_seconds'] for r in of_stage):.1f}",
                sorted({r["exit_code"] for r in of_stage}),
                sum(r["processes_left"] for r in of_stage),
            ]
        )
    ready = [r["stage_reached_s"] for r in runs if r["stage"] == "ready"]
    result = {
        "runs": runs,
        "ready_seconds": spread(ready) if ready else None,
        "summary": markdown_table(
            ["signalled at", "runs", "slowest stop s", "fastest stop s", "exit codes", "processes left"], rows
        ),
    }
    print(result["summary"])
    write_result(args.out, result)
    failed = [r for r in runs if r["exit_code"] != 0 or r["processes_left"] or r["stop_seconds"] >= 10.0]
    if failed:
        print(f"the logs are in {work}", file=sys.stderr)
        return 1
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
