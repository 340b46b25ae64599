"""CPU time per request of the app itself, in process: the real ASGI app (admission, middleware, FastAPI, the
routes, decoding, the batcher, the pipeline, metrics, rendering) driven without sockets or an HTTP parser.

A tool for comparing changes to the request path on a busy machine: the process's CPU time (every thread,
ONNX Runtime's included) per request is much less sensitive to other processes than a rate is (on the shared
2-core machine, passes of one run still differ by 10-20%, so compare medians of alternating runs). It leaves out
what uvicorn does (HTTP parsing, the socket writes), which bench/peer_compare.py measures with the rest.

The bodies are bench/peer_compare.py's held-out test split, sent ``--concurrency`` at a time, ``--rounds`` passes
over the split; the figure is the median over rounds of CPU seconds / requests. ``--profile FILE`` writes a
cProfile (CPU time of the event loop's thread) of one extra pass (``python -m pstats FILE``).

``--baseline DIR`` compares this checkout with another one (``git worktree add DIR <commit>``), each run in a
process of its own, the two alternating ``--rounds`` times, with the same bodies and the same Python environment.

    python -m bench.request_cost [--rounds 5] [--concurrency 32] [--route auto] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_STORE, REPO, RESULTS, load_test_split, write_result

HELD_OUT_SEED = 7  # bench/peer_compare.py's

PATH = "/v1/classify"
BATCH_PATH = "/v1/classify/batch"


def scope_of(body: bytes, path: str = PATH) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(app, body: bytes, path: str = PATH) -> tuple[int, bytes]:
    """One request through the ASGI app; its status and body."""
    delivered = False
    status, chunks = 0, []

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope_of(body, path), receive, send)
    return status, b"".join(chunks)


def batches(app) -> tuple[float, float]:
    """(requests, batches) the app's batcher has run so far, from its dynfuse_batch_size histogram."""
    registry = app.state.metrics.registry
    return registry.get_sample_value("dynfuse_batch_size_sum", {"model": app.state.metrics.model}) or 0.0, (
        registry.get_sample_value("dynfuse_batch_size_count", {"model": app.state.metrics.model}) or 0.0
    )


async def one_pass(app, bodies: list[bytes], concurrency: int, path: str = PATH, pairs: int = 1) -> dict:
    """Every body once, ``concurrency`` in flight; CPU and wall seconds, the statuses, the mean batch. ``requests``
    counts pairs: ``pairs`` per body (the inputs of a batch call)."""
    statuses: dict[int, int] = {}
    position = 0
    batched, count = batches(app)

    async def client():
        nonlocal position
        while position < len(bodies):
            body = bodies[position]
            position += 1
            status, _ = await call(app, body, path)
            statuses[status] = statuses.get(status, 0) + 1

    cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    cpu, loop_cpu, wall = time.process_time() - cpu, time.thread_time() - loop_cpu, time.perf_counter() - wall
    batched_after, count_after = batches(app)
    mean_batch = (batched_after - batched) / max(count_after - count, 1)
    return {
        "cpu_s": cpu,
        "event_loop_cpu_s": loop_cpu,  # the thread that runs the requests' Python; the batch worker and runtime aside
        "wall_s": wall,
        "requests": len(bodies) * pairs,
        "statuses": statuses,
        "mean_batch": mean_batch,
    }


async def measure(args, bodies: list[bytes]) -> dict:
    from service.config import Settings
    from service.gc_policy import tune_for_serving
    from service.main import create_app

    app = create_app(Settings(store=args.store, max_batch_delay_ms=args.batch_delay_ms))
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 300
        while not (app.state.repository.started and app.state.service is not None):
            if app.state.load_error or time.monotonic() > deadline:
                raise RuntimeError(f"the model did not load: {app.state.load_error}")
            await asyncio.sleep(0.05)
        tune_for_serving()
        path, pairs = (BATCH_PATH, args.batch) if args.batch else (PATH, 1)
        status, answer = await call(app, bodies[0], path)
        assert status == 200, f"the first request was answered {status}: {answer[:500]!r}"
        await one_pass(app, bodies, args.concurrency, path, pairs)  # warm-up
        passes = [await one_pass(app, bodies, args.concurrency, path, pairs) for _ in range(args.rounds)]
        if args.profile is not None:
            profiler = cProfile.Profile(time.thread_time)  # CPU time: what other processes take is left out
            profiler.enable()
            await one_pass(app, bodies, args.concurrency, path, pairs)
            profiler.disable()
            profiler.dump_stats(str(args.profile))
    return {"passes": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"held-out data set (default: made with seed {HELD_OUT_SEED})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--route", default="auto", help="route of every request: auto, or an expert's name")
    parser.add_argument(
        "--batch", type=int, default=0, help="send /v1/classify/batch calls of this many pairs (figures per pair)"
    )
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=50.0,
        help="DYNFUSE_MAX_BATCH_DELAY_MS: long enough that batches fill (16) however slow the machine is, so that "
        "what a request costs does not depend on the machine's load through the batch size",
    )
    parser.add_argument("--profile", type=Path, help="cProfile of one more pass, written here")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with, alternating runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "request_cost.json")
    args = parser.parse_args(argv)

    import uvloop  # as uvicorn serves

    if args.data is None:
        from bench.peer_compare import held_out_data

        data = held_out_data(args.store, None, HELD_OUT_SEED)
    else:
        data = args.data
    if args.baseline is not None:
        return compare(args, data.resolve())
    samples = load_test_split(data)
    inputs = [{"image": base64.b64encode(s["png"]).decode(), "text": s["text"]} for s in samples]
    if args.batch:
        bodies = [
            json.dumps({"inputs": inputs[i : i + args.batch], "route": args.route}).encode()
            for i in range(0, len(inputs) - args.batch + 1, args.batch)
        ]
    else:
        bodies = [json.dumps(entry | {"route": args.route}).encode() for entry in inputs]
    result = uvloop.run(measure(args, bodies))
    per_request = [1000 * p["cpu_s"] / p["requests"] for p in result["passes"]]
    loop_per_request = [1000 * p["event_loop_cpu_s"] / p["requests"] for p in result["passes"]]
    rates = [p["requests"] / p["wall_s"] for p in result["passes"]]
    statuses: dict[int, int] = {}
    for p in result["passes"]:
        for status, count in p["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    mean_batch = statistics.mean(p["mean_batch"] for p in result["passes"])
    unit = "pair" if args.batch else "request"
    print(
        f"CPU ms/{unit}: median {statistics.median(per_request):.3f} ({', '.join(f'{v:.3f}' for v in per_request)}); "
        f"of which the event loop {statistics.median(loop_per_request):.3f}; "
        f"req/s {statistics.median(rates):,.0f}; mean batch {mean_batch:.1f}; statuses {statuses}"
    )
    write_result(
        args.out,
        {
            "figure": "CPU time per request of the app in process",
            "route": args.route,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "bodies": len(bodies),
            "cpu_ms_per_request": per_request,
            "cpu_ms_per_request_median": statistics.median(per_request),
            "event_loop_cpu_ms_per_request": loop_per_request,
            "requests_per_second": rates,
            "statuses": statuses,
            "mean_batch": mean_batch,
            "batch_delay_ms": args.batch_delay_ms,
            "loadavg": os.getloadavg(),
        },
    )
    return 0


def compare(args, data: Path) -> int:
    """This checkout against ``args.baseline``, one process per run, alternating; each run makes two passes."""
    roots = {"this": REPO, "baseline": args.baseline.resolve()}
    script = Path(__file__).resolve()
    values: dict[str, list[float]] = {name: [] for name in roots}
    loop_values: dict[str, list[float]] = {name: [] for name in roots}
    with tempfile.TemporaryDirectory(prefix="dynfuse-cost-") as work:
        for index in range(args.rounds):
            for name in roots if index % 2 == 0 else reversed(roots):
                out = Path(work) / f"{name}-{index}.json"
                command = [sys.executable, str(script), "--rounds", "2", "--store", str(args.store.resolve())]
                command += ["--data", str(data), "--route", args.route, "--concurrency", str(args.concurrency)]
                command += ["--batch-delay-ms", str(args.batch_delay_ms), "--batch", str(args.batch)]
                env = {**os.environ, "PYTHONPATH": str(roots[name]), "DYNFUSE_LOG_LEVEL": "warning"}
                subprocess.run(command + ["--out", str(out)], cwd=roots[name], env=env, check=True, timeout=900)
                run = json.loads(out.read_text())
                values[name] += run["cpu_ms_per_request"]
                loop_values[name] += run.get("event_loop_cpu_ms_per_request", [])
                print(f"run {index + 1} {name}: {', '.join(f'{v:.3f}' for v in run['cpu_ms_per_request'])} CPU ms/req")
    medians = {name: statistics.median(v) for name, v in values.items()}
    loop_medians = {name: statistics.median(v) for name, v in loop_values.items() if v}
    change = medians["this"] / medians["baseline"] - 1
    print(f"CPU ms/request: this {medians['this']:.3f}, baseline {medians['baseline']:.3f} ({change:+.1%})")
    if len(loop_medians) == 2:
        loop_change = loop_medians["this"] / loop_medians["baseline"] - 1
        print(
            f"of which the event loop: this {loop_medians['this']:.3f}, baseline {loop_medians['baseline']:.3f} "
            f"({loop_change:+.1%})"
        )
    write_result(
        args.out,
        {
            "figure": "CPU time per request of the app in process, this checkout against a baseline",
            "baseline": str(roots["baseline"]),
            "route": args.route,
            "concurrency": args.concurrency,
            "cpu_ms_per_request": values,
            "median": medians,
            "change": change,
            "event_loop_cpu_ms_per_request": loop_values,
            "event_loop_median": loop_medians,
            "loadavg": os.getloadavg(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
