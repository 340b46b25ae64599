"""dynfuse against a generic batching server (LitServe), one server at a time, with held-out bodies under wrk.

Each round starts every server in turn on a free loopback port, warms it with 3 s of load, drives it with wrk at
one concurrency (32 by default) for ``--seconds``, then stops it before the next starts; so no two servers ever
share the machine, and the rounds interleave the servers so that a change in the machine's load hits them all.
The servers (bench/peer_servers.py has the peers):

- ``dynfuse-auto``: ``dynfuse serve`` with its defaults, ``/v1/classify``, route ``auto``;
- ``dynfuse-full``: the same server, every request with the full expert forced (``"route": <full expert>``);
- ``litserve-full``: LitServe serving the static full expert of the same store (no glimpse, no router);
- ``litserve-auto``: LitServe running dynfuse's pipeline with route ``auto``;
- ``fastapi-decode`` (not by default): bare FastAPI that decodes the bodies and runs no model.

The bodies are the test split of a synthetic data set whose seed the model's training never saw (made here when
it is missing), base64 PNG in JSON. Besides req/s the script records each server's CPU time per answered
request: utime + stime of the server's whole process tree (``/proc/<pid>/stat``) over the measured level,
divided by the 2xx answers. That figure depends far less on what else runs on the machine than req/s does, so it
is the one to compare optimizations by on a shared machine; req/s is the goal's, to be read on a quiet one. How
long the server's threads waited, runnable, for a CPU (``schedstat``) says how much a reading was starved: on a
busy machine the scheduler shares the cores per thread, so a server of several processes gets more of them.
Before the load, 48 bodies are sent one by one and their answers checked against the labels, so every server is
seen serving the real model.

    python -m bench.peer_compare [--rounds 3] [--seconds 15] [--servers dynfuse-auto,litserve-full]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from bench.common import (
    DEFAULT_STORE,
    REPO,
    RESULTS,
    CpuWatch,
    free_port,
    load_test_split,
    markdown_table,
    write_result,
)

SERVERS = ("dynfuse-auto", "dynfuse-full", "litserve-full", "litserve-auto", "fastapi-decode")
DEFAULT_SERVERS = SERVERS[:4]
HELD_OUT_SEED = 7
# The goals of issue 24: dynfuse auto >= 1.6x LitServe serving the static full expert and >= LitServe running
# dynfuse's pipeline; dynfuse with the full expert forced >= LitServe's static full expert.
GOALS = (
    ("dynfuse-auto", "litserve-full", 1.6),
    ("dynfuse-auto", "litserve-auto", 1.0),
    ("dynfuse-full", "litserve-full", 1.0),
)
CHECKED_BODIES = 48
IDLE_S = 5.0  # the server's CPU with no load, measured before each level


def held_out_data(store: Path, data: Path | None, seed: int) -> Path:
    """A data set the model's training never saw: ``data``, or the store's generator at ``seed`` (made if missing)."""
    from export.store import load_model

    model = load_model(store)
    trained_on = model.manifest.get("training", {}).get("data", {}).get("dir", "")
    match = re.search(r"-s(\d+)-", Path(trained_on).name)
    training_seed = int(match.group(1)) if match else None
    if data is None:
        size = model.preprocessing.image_size
        data = REPO / "build" / f"heldout-s{seed}-{size}px"
        if not (data / "test.jsonl").exists():
            command = [sys.executable, "-m", "service.cli", "data", "synth", "--out", str(data), "--seed", str(seed)]
            command += ["--image-size", str(size), "--ood-size", "0", "--force", "--quiet"]
            subprocess.run(command, cwd=REPO, check=True, timeout=1800)
    synth = json.loads((data / "synth.json").read_text())
    data_seed = synth["config"]["seed"]
    if training_seed is not None and data_seed == training_seed:
        raise SystemExit(f"{data} was made with seed {data_seed}, the seed of the model's training data: use another")
    return data


def write_bodies(samples: list[dict], work: Path, full_expert: str) -> dict[str, Path]:
    """One JSON body per line: as /v1/classify reads them, and the same with the full expert forced."""
    files = {"plain": work / "plain.jsonl", "full": work / "full.jsonl"}
    with files["plain"].open("w") as plain, files["full"].open("w") as full:
        for s in samples:
            body = {"image": base64.b64encode(s["png"]).decode(), "text": s["text"]}
            plain.write(json.dumps(body) + "\n")
            full.write(json.dumps({**body, "route": full_expert}) + "\n")
    return files


class Server:
    """One server under test in its own session (so that it and every process it starts are stopped together)."""

    def __init__(self, name: str, store: Path, log: Path, workers: int | None, baseline: Path | None = None):
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DYNFUSE_LOG_LEVEL": "warning"}
        root = REPO
        if name.endswith("@baseline"):  # dynfuse from another checkout, in the same Python environment
            root = baseline
            env["PYTHONPATH"] = str(baseline)
        if name.startswith("dynfuse"):
            command = [sys.executable, "-m", "service.cli", "serve", "--store", str(store), "--host", "127.0.0.1"]
            command += ["--port", str(self.port), *(["--workers", str(workers)] if workers else [])]
            self.ready_path = "/readyz"
        else:
            command = [
                sys.executable,
                "-m",
                "bench.peer_servers",
                name,
                "--store",
                str(store),
                "--port",
                str(self.port),
            ]
            self.ready_path = "/health"
        self.process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.log = log

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s: {self.log.read_text()[-2000:]}")

    def cpu_ticks(self) -> dict[int, int]:
        """utime + stime of every live process of the server's tree, by pid."""
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
        tree, frontier = {self.process.pid}, [self.process.pid]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
            tree.update(children)
            frontier.extend(children)
        return {pid: ticks[pid] for pid in tree if pid in ticks}

    def run_queue_wait_s(self) -> float:
        """Seconds the tree's live threads have waited, runnable, for a CPU (/proc/<pid>/task/<tid>/schedstat)."""
        waited = 0
        for pid in self.cpu_ticks():
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError, ValueError):
                    waited += int((task / "schedstat").read_text().split()[1])
        return waited / 1e9

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # what it left behind (LitServe's workers outlive it)
            os.killpg(self.process.pid, signal.SIGKILL)


def check_answers(base: str, bodies: Path, samples: list[dict]) -> dict:
    """Send the first bodies one at a time; the share answered with the right label."""
    right = 0
    lines = bodies.read_text().splitlines()[:CHECKED_BODIES]
    for line, sample in zip(lines, samples, strict=False):
        request = urllib.request.Request(
            f"{base}/v1/classify", line.encode(), {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                right += json.loads(response.read())["label"] == sample["label"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{base} answered {error.code}: {error.read()[:500]!r}") from None
    return {"bodies": len(lines), "accuracy": right / len(lines)}


def idle_cores(server: Server, seconds: float) -> float:
    """Cores the server uses with no request in flight (a server that polls its queues spends CPU idle)."""
    before = server.cpu_ticks()
    time.sleep(seconds)
    after = server.cpu_ticks()
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / os.sysconf("SC_CLK_TCK") / seconds


def wrk(base: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    lua = REPO / "bench" / "wrk_classify.lua"
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(lua), base]
    env = {"DYNFUSE_BENCH_BODIES": str(bodies), "DYNFUSE_BENCH_PATH": "/v1/classify", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    return json.loads(lines[-1][5:])


def measure(server: Server, bodies: Path, concurrency: int, seconds: float) -> dict:
    """One level of load; req/s, latency and the server's CPU seconds per answered request."""
    load_before = os.getloadavg()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, waited = server.cpu_ticks(), server.run_queue_wait_s()
    with CpuWatch(tuple(before)) as watch:
        load = wrk(server.base, bodies, concurrency, seconds)
    after, waited = server.cpu_ticks(), server.run_queue_wait_s() - waited
    wrk_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / os.sysconf("SC_CLK_TCK")
    answered = load["requests"] - load["errors"]["status"]
    wall = load["duration_s"]
    return {
        "requests_per_second": answered / wall,
        "answered": answered,
        "errors": load["errors"],
        "latency_ms": load["latency_ms"],
        "server_cpu_s": cpu_s,
        "server_cpu_ms_per_request": 1000 * cpu_s / max(answered, 1),
        "server_cores": cpu_s / wall,
        "server_processes": len(after),
        # Runnable but not running: on a busy machine, what the server's threads lost to other processes.
        "server_run_queue_wait_per_s": waited / wall,
        "wrk_cores": (wrk_usage.ru_utime + wrk_usage.ru_stime - children.ru_utime - children.ru_stime) / wall,
        "foreign_cpu_share": watch.foreign_share,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def profile(server: Server, bodies: Path, concurrency: int, seconds: float, out: Path) -> dict:
    """py-spy (100 Hz, every thread) on the server's main process under the same load; the stages of the request
    path it saw (bench/profile_report.py). Not a measured level: py-spy takes CPU from the server."""
    from bench.profile_report import analyze, render

    load: dict = {}
    thread = threading.Thread(target=lambda: load.update(wrk(server.base, bodies, concurrency, seconds + 3)))
    thread.start()
    time.sleep(1.5)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [py_spy, "record", "--pid", str(server.process.pid), "--duration", f"{seconds:g}", "--rate", "100"]
    command += ["--nonblocking", "--threads", "--format", "raw", "-o", str(out)]
    spy = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    thread.join()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr[-1000:]}")
    report = analyze(out)
    print("\n" + render(report))
    return {"file": str(out), "load_while_profiling": load, **report}


def summary(runs: list[dict]) -> dict:
    def median(key):
        return statistics.median(r[key] for r in runs)

    def extent(key):
        return [min(r[key] for r in runs), max(r[key] for r in runs)]

    return {
        "requests_per_second": median("requests_per_second"),
        "requests_per_second_range": extent("requests_per_second"),
        "server_cpu_ms_per_request": median("server_cpu_ms_per_request"),
        "server_cpu_ms_range": extent("server_cpu_ms_per_request"),
        "server_cores": median("server_cores"),
        "idle_cores": median("idle_cores"),
        "server_run_queue_wait_per_s": median("server_run_queue_wait_per_s"),
        "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs),
        "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "foreign_cpu_share": statistics.median(r["foreign_cpu_share"] or 0.0 for r in runs),
        "loadavg_1min": statistics.median(r["loadavg_before"][0] for r in runs),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"held-out data set (default: made with seed {HELD_OUT_SEED})")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help=f"comma-separated, of {SERVERS}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured load per server and round")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before each measurement, not recorded")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, help="dynfuse serve --workers (default: dynfuse's own default)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (git worktree add DIR <commit>): each dynfuse server runs from it too, as NAME@baseline",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_compare.json")
    parser.add_argument(
        "--profile", type=Path, help="also record py-spy's raw stacks of dynfuse-auto here (after round 1's level)"
    )
    args = parser.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        servers += [f"{name}@baseline" for name in servers if name.startswith("dynfuse")]

    from export.store import load_model

    data = held_out_data(args.store, args.data, HELD_OUT_SEED)
    model = load_model(args.store)
    samples = load_test_split(data)
    work = Path(tempfile.mkdtemp(prefix="dynfuse-peers-"))
    files = write_bodies(samples, work, model.full_expert)
    seed = json.loads((data / "synth.json").read_text())["config"]["seed"]
    print(f"{len(samples)} held-out bodies (seed {seed}) from {data}; {model.name} v{model.version}")

    runs: dict[str, list[dict]] = {name: [] for name in servers}
    profiles: dict[str, dict] = {}
    checks: dict[str, list[dict]] = {name: [] for name in servers}
    for index in range(args.rounds):
        order = servers if index % 2 == 0 else servers[::-1]
        for name in order:
            bodies = files["full" if name.startswith("dynfuse-full") else "plain"]
            server = Server(name, args.store.resolve(), work / f"{name}-{index}.log", args.workers, args.baseline)
            try:
                ready_s = server.wait_ready()
                checks[name].append(check_answers(server.base, bodies, samples))
                idle = idle_cores(server, IDLE_S)
                wrk(server.base, bodies, args.concurrency, args.warmup)
                run = measure(server, bodies, args.concurrency, args.seconds) | {"ready_s": ready_s, "idle_cores": idle}
                if args.profile and name == "dynfuse-auto" and index == 0:  # this checkout's
                    profiles[name] = profile(server, bodies, args.concurrency, args.seconds, args.profile)
            finally:
                server.stop()
            runs[name].append(run)
            print(
                f"round {index + 1} {name}: {run['requests_per_second']:,.0f} req/s, "
                f"{run['server_cpu_ms_per_request']:.3f} CPU ms/request ({run['server_cores']:.2f} cores), "
                f"p99 {run['latency_ms']['p99']:.0f} ms, waited for a CPU {run['server_run_queue_wait_per_s']:.2f} "
                f"thread-s/s, load {run['loadavg_before'][0]:.1f}, "
                f"others {run['foreign_cpu_share'] or 0:.0%}",
                flush=True,
            )

    summaries = {name: summary(r) for name, r in runs.items()}
    rows = [
        [
            name,
            f"{s['requests_per_second']:,.0f}",
            f"{s['requests_per_second_range'][0]:,.0f}–{s['requests_per_second_range'][1]:,.0f}",
            f"{s['server_cpu_ms_per_request']:.3f}",
            f"{s['server_cores']:.2f}",
            f"{s['idle_cores']:.2f}",
            f"{s['server_run_queue_wait_per_s']:.2f}",
            f"{s['p50_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            s["errors"],
            f"{statistics.mean(c['accuracy'] for c in checks[name]):.0%}",
            f"{s['foreign_cpu_share']:.0%}",
            f"{s['loadavg_1min']:.1f}",
        ]
        for name, s in summaries.items()
    ]
    header = ["server", "req/s (median)", "range", "CPU ms/request", "cores", "idle cores", "waited for a CPU"]
    header += ["p50 ms", "p99 ms"]
    header.append("errors")
    print(markdown_table([*header, "checked right", "others' CPU", "load (1 min)"], rows))

    goals = []
    for mine, peer, ratio in GOALS:
        if mine in summaries and peer in summaries:
            measured = summaries[mine]["requests_per_second"] / summaries[peer]["requests_per_second"]
            cpu = summaries[peer]["server_cpu_ms_per_request"] / summaries[mine]["server_cpu_ms_per_request"]
            goals.append({"server": mine, "peer": peer, "goal": ratio, "req_per_s_ratio": measured,
                          "met": measured >= ratio, "cpu_per_request_ratio": cpu})  # fmt: skip
            print(f"{mine} / {peer}: {measured:.2f}x req/s (goal >= {ratio}), {cpu:.2f}x less CPU per request")
    against_baseline = {}
    for name in summaries:
        if name.endswith("@baseline") and name.removesuffix("@baseline") in summaries:
            this, base = summaries[name.removesuffix("@baseline")], summaries[name]
            change = this["server_cpu_ms_per_request"] / base["server_cpu_ms_per_request"] - 1
            against_baseline[name.removesuffix("@baseline")] = change
            print(f"{name.removesuffix('@baseline')}: {change:+.1%} CPU per request against {args.baseline}")
    write_result(
        args.out,
        {
            "figure": "dynfuse against a generic batching server",
            "data": {"dir": str(data), "bodies": len(samples), "seed": seed},
            "model": {"name": model.name, "version": model.version, "full_expert": model.full_expert},
            "peers": {"litserve": metadata.version("litserve")},
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "dynfuse_workers": args.workers or "default",
            "checks": checks,
            "runs": runs,
            "summary": summaries,
            "goals": goals,
            "profiles": profiles,
            "baseline": str(args.baseline) if args.baseline else None,
            "cpu_per_request_against_baseline": against_baseline,
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
