"""Figure 3: HTTP overhead. Throughput and latency of a real ``dynfuse serve`` (uvicorn) at concurrency 1,
8 and 32, against the in-process pipeline with the same batch settings; the server's memory; a py-spy
profile of the request path under load.

In one run: (1) the in-process limit, measured first while no server runs: ``predict`` on batches of
``max_batch_size`` from pre-decoded inputs, and the same with each request's body parsed, decoded and
preprocessed as the server does it; (2) the server on a free loopback port, loaded by a separate
process (wrk when installed, else ``bench/load_client.py``) with real test-split images and captions,
rotating, each level bounded in time; (3) VmRSS/VmHWM from /proc; (4) py-spy at concurrency 32.

    python -m bench.http_load [--seconds 15]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DEFAULT_STORE,
    REPO,
    RESULTS,
    CpuWatch,
    batch_counters,
    chunks,
    cpu_seconds,
    decoded_inputs,
    load_test_split,
    markdown_table,
    proc_status,
    server_processes,
    spread,
    start_server,
    stop_server,
    wait_for_quiet,
    write_result,
)
from bench.profile_report import record_profile

GOAL = 0.5  # HTTP throughput at concurrency 32 over the in-process throughput
LEVELS = (1, 8, 32)
PREDICT_ONLY, WITH_DECODE = "predict only (pre-decoded)", "parse + decode + preprocess + predict"


def in_process(store: Path, samples: list[dict], bodies: list[bytes]):
    """A function of ``rounds`` -> seconds per round over the split of the pipeline alone, batched as the server
    batches, in two variants: pre-decoded inputs, and each body parsed, decoded and preprocessed as the server does."""
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from service.config import Settings
    from service.decode import decode_base64
    from service.inference import ClientInput, InferenceService
    from service.metrics import Metrics
    from service.schemas import ClassifyRequest

    settings = Settings(store=store)
    model = load_model(store, settings.model, settings.model_version)
    pipeline = DynamicPipeline(model, create_backend(settings.backend, settings.device, settings.threads))
    pipeline.warmup(batch_sizes=(1, settings.max_batch_size))
    service = InferenceService(settings, model, pipeline, Metrics(model.name))
    decoded = chunks(decoded_inputs(pipeline, samples), settings.max_batch_size)
    raw = chunks(bodies, settings.max_batch_size)

    def client_input(body: bytes) -> ClientInput:  # what the route does before the batcher
        parsed = ClassifyRequest.model_validate_json(body)
        return ClientInput(decode_base64(parsed.image), parsed.text, parsed.route, parsed.threshold)

    variants = {
        PREDICT_ONLY: lambda: [pipeline.predict(batch) for batch in decoded],
        WITH_DECODE: lambda: [
            pipeline.predict([service.prepare_now(client_input(body)) for body in batch]) for batch in raw
        ],
    }

    def measure(rounds: int) -> dict[str, list[float]]:
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
        return seconds

    return measure, settings.max_batch_size


def run_load(generator: str, url: str, bodies: Path, concurrency: int, seconds: float, server: tuple[int, ...]) -> dict:
    """One bounded load level from a separate process; its JSON line plus CPU used by server and generator."""
    if generator == "wrk":
        lua = REPO / "bench" / "wrk_classify.lua"
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(lua), url]
    else:
        command = [sys.executable, "-m", "bench.load_client", "--url", url, "--bodies", str(bodies)]
        command += ["-c", str(concurrency), "-d", str(seconds), "--max-requests", "200000"]
    env = {**os.environ, "DYNFUSE_BENCH_BODIES": str(bodies)}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = cpu_seconds(server)
    batched, batches = batch_counters(url)
    with CpuWatch(server) as watch:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    batched_after, batches_after = batch_counters(url)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    result = json.loads(lines[-1][5:])
    wall = result["duration_s"]
    result |= {
        "concurrency": concurrency,
        "requests_per_second": result["requests"] / wall,
        "error_count": sum(result["errors"].values()),
        "server_cpu_cores": (cpu_seconds(server) - server_cpu) / wall,
        "generator_cpu_cores": (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / wall,
        "foreign_cpu_share": watch.foreign_share,
        "mean_batch_size": (batched_after - batched) / max(batches_after - batches, 1),
    }
    return result


def tables(result: dict) -> str:
    limits = result["in_process"]["variants"]
    limit_rows = [
        [name, f"{v['requests_per_second']:,.0f}", f"{v['seconds']['min']:.2f}–{v['seconds']['max']:.2f} s"]
        for name, v in limits.items()
    ]
    names = list(limits)
    load_rows = [
        [
            level["concurrency"],
            f"{level['requests_per_second']:,.0f}",
            *(f"{level['latency_ms'][q]:.1f}" for q in ("p50", "p95", "p99")),
            level["error_count"],
            f"{level['mean_batch_size']:.1f}",
            f"{level['server_cpu_cores']:.2f}",
            f"{level['generator_cpu_cores']:.2f}",
            f"{level['foreign_cpu_share']:.0%}",
            *(f"{level['requests_per_second'] / limits[n]['requests_per_second']:.0%}" for n in names),
        ]
        for level in result["levels"]
    ]
    memory = result["memory_mib"]
    parts = [
        markdown_table([f"in process, batches of {result['in_process']['batch_size']}", "req/s", "range"], limit_rows),
        markdown_table(
            ["concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "server CPU (cores)"]
            + ["generator CPU", "other processes' CPU", "of in-process (pre-decoded)", "of in-process (with decode)"],
            load_rows,
        ),
        markdown_table(
            [f"dynfuse serve memory ({result['workers']} worker process(es), summed)", "VmRSS MiB", "VmHWM MiB"],
            [[when, m["VmRSS"], m["VmHWM"]] for when, m in memory.items()],
        ),
    ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load level")
    parser.add_argument("--rounds", type=int, default=7, help="in-process rounds over the split")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--workers", type=int, default=1, help="dynfuse serve --workers (default 1)")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy (always skipped with --workers > 1)")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_load.json")
    args = parser.parse_args(argv)
    generator = args.generator if args.generator != "auto" else ("wrk" if shutil.which("wrk") else "python")

    samples = load_test_split(args.data)
    bodies = [json.dumps({"image": base64.b64encode(s["png"]).decode(), "text": s["text"]}).encode() for s in samples]
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-"))
    bodies_file = work / "bodies.jsonl"
    bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
    print(
        f"{len(bodies)} test-split bodies, mean {statistics.mean(map(len, bodies)) / 1024:.1f} KiB; load: {generator}"
    )

    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    result = {"generator": generator, "foreign_cpu_share_before": quiet}
    measure, batch_size = in_process(args.store, samples, bodies)
    with CpuWatch() as watch:
        seconds = measure(args.rounds)  # the limit, while no server runs; again at the end, so drifts fall on both
    foreign = [watch.foreign_share]
    process, base = start_server(args.store, work / "server.log", args.workers)
    result["workers"] = args.workers
    try:
        time.sleep(2.0)
        server = server_processes(process.pid)
        result["memory_mib"] = {"idle after start-up warm-up": proc_status(server)}
        url = f"{base}/v1/classify"
        run_load(generator, url, bodies_file, 8, 3, server)  # warm the HTTP path; not recorded
        result["levels"] = []
        for concurrency in LEVELS:
            level = run_load(generator, url, bodies_file, concurrency, args.seconds, server)
            result["levels"].append(level)
            print(
                f"c={concurrency}: {level['requests_per_second']:,.0f} req/s, p99 {level['latency_ms']['p99']:.1f} ms"
            )
        result["memory_mib"]["after the load levels"] = proc_status(server)
        if not args.no_profile and args.workers == 1:
            load = lambda seconds: run_load(generator, url, bodies_file, 32, seconds, server)  # noqa: E731
            result["profile"] = record_profile(process.pid, args.seconds, "", load)
            result["memory_mib"]["after profiling (2 more levels at c=32)"] = proc_status(server)
    finally:
        stop_server(process)
    log = (work / "server.log").read_text()
    result["server_log"] = {
        "unhandled_errors": log.count("unhandled error"),
        "client_disconnects": log.count("starlette.requests.ClientDisconnect"),
    }
    with CpuWatch() as watch:
        for name, more in measure(args.rounds).items():
            seconds[name] += more
    result["in_process"] = {
        "batch_size": batch_size,
        "foreign_cpu_share": max(foreign + [watch.foreign_share]),
        "variants": {
            name: {"seconds": spread(s), "requests_per_second": len(bodies) / statistics.median(s)}
            for name, s in seconds.items()
        },
    }
    top = result["levels"][-1]["requests_per_second"]
    limits = result["in_process"]["variants"]
    result["ratio_c32"] = {name: top / v["requests_per_second"] for name, v in limits.items()}
    fair = limits[WITH_DECODE]["requests_per_second"]
    result["goal"] = {"ratio_at_least": GOAL, "against": WITH_DECODE, "ratio": top / fair, "met": top >= GOAL * fair}
    print("\n" + tables(result))
    print(
        "\nc=32 over in-process: "
        + ", ".join(f"{name}: {ratio:.0%}" for name, ratio in result["ratio_c32"].items())
        + f". Goal (>= {GOAL:.0%} of in-process with decode): {'MET' if result['goal']['met'] else 'NOT MET'}"
    )
    write_result(args.out, {"figure": "HTTP overhead", **result})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
