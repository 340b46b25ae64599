"""Degrading instead of refusing: a burst at 3x the sustainable rate, with DYNFUSE_DEGRADE_TO off and on.

One run, one server configuration apart from the setting:

1. With degradation off, a closed loop of ``--concurrency`` clients measures the sustainable rate R (requests
   per second answered 200, every one of them).
2. An open-loop burst sends ``--factor`` x R requests per second for ``--seconds`` (arrivals on a fixed
   schedule, whatever the answers do, as a spike of independent users would), first with the setting off,
   then with it on (``--degrade-to``, by default the model's cheapest operating point).

For each: requests answered 200 against refused 503, p50/p99 of the answered ones, the accuracy of all
answers and of the degraded ones against the test split's labels.

Each request is a ``/v1/classify/batch`` call of ``--rows`` pairs (16 by default), so that the model's work,
the only thing a cheaper operating point can save, is a large part of each request's cost. With single pairs
on this 2-core machine the HTTP request path costs several times the model (bench/BENCHMARKS.md, figure 3),
and the batcher's queue, which the degradation watches, never fills: requests wait in the kernel's accept
queue instead.

The client is raw asyncio (one connection per request, the bytes prepared beforehand) so that it spends as
little of the 2 cores as it can; it still shares them with the server, and the result says how busy the
machine was.

    python -m bench.degrade [--seconds 10] [--factor 3] [--rows 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DEFAULT_STORE,
    RESULTS,
    CpuWatch,
    load_test_split,
    markdown_table,
    percentile,
    start_server,
    stop_server,
    wait_for_quiet,
    write_result,
)


def request_bytes(port: int, samples: list[dict]) -> bytes:
    inputs = [{"image": base64.b64encode(s["png"]).decode(), "text": s["text"]} for s in samples]
    body = json.dumps({"inputs": inputs}).encode()
    head = (
        f"POST /v1/classify/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def one_request(port: int, payload: bytes, timeout: float = 30.0) -> tuple[int, float, dict | None]:
    """(status, seconds, JSON body of a 200 or None); status 0 when the connection failed."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)  # Connection: close -> read to EOF
        writer.close()
    except (OSError, asyncio.TimeoutError):
        return 0, time.perf_counter() - started, None
    seconds = time.perf_counter() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, seconds, None
    return status, seconds, json.loads(body) if status == 200 else None


async def closed_loop(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    answered, statuses = 0, {}
    deadline = time.perf_counter() + seconds
    order = iter(range(10**9))

    async def client() -> None:
        nonlocal answered
        while time.perf_counter() < deadline:
            status, _, _ = await one_request(port, payloads[next(order) % len(payloads)])
            statuses[status] = statuses.get(status, 0) + 1
            answered += status == 200

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"rate_per_s": answered / elapsed, "statuses": statuses, "seconds": elapsed}


async def open_loop(port: int, payloads: list[bytes], labels: list[list[str]], rate: float, seconds: float) -> dict:
    """Requests at ``rate`` per second on a fixed schedule for ``seconds``; every answer waited for."""
    count = int(rate * seconds)
    tasks, order = [], list(range(count))
    started = time.perf_counter()
    for i in order:
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(port, payloads[i % len(payloads)])))
    sent_in = time.perf_counter() - started
    results = await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [(i, seconds, body) for i, (status, seconds, body) in enumerate(results) if status == 200]
    latencies = [seconds * 1000 for _, seconds, _ in ok]
    answers = [  # (right, degraded, operating point) per row
        (out["label"] == label, out["route"]["degraded"], out["route"]["operating_point"])
        for i, _, body in ok
        for out, label in zip(body["outputs"], labels[i % len(labels)], strict=True)
    ]
    right = [r for r, _, _ in answers]
    degraded = [r for r, d, _ in answers if d]
    points: dict[str, int] = {}
    for _, _, point in answers:
        points[point] = points.get(point, 0) + 1
    return {
        "sent": count,
        "target_rate_per_s": rate,
        "achieved_send_rate_per_s": count / sent_in,
        "statuses": statuses,
        "answered_200": len(ok),
        "answered_share": len(ok) / count,
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "rows_answered": len(answers),
        "accuracy": sum(right) / len(right) if right else None,
        "degraded": len(degraded),
        "degraded_accuracy": sum(degraded) / len(degraded) if degraded else None,
        "operating_points": points,
    }


def cheapest_point(base: str, model: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"{base}/v1/models/{model}", timeout=10) as response:
        described = json.loads(response.read())
    points = described["operating_points"]  # cheapest first
    return points[0]["name"], described["default_operating_point"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each burst")
    parser.add_argument("--factor", type=float, default=3.0, help="burst rate over the sustainable rate")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the closed loop that measures R")
    parser.add_argument("--rows", type=int, default=16, help="pairs per /v1/classify/batch request")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--threads", type=int, default=1, help="DYNFUSE_THREADS of the server")
    parser.add_argument("--degrade-to", help="default: the model's cheapest operating point")
    parser.add_argument("--out", type=Path, default=RESULTS / "degrade.json")
    args = parser.parse_args()

    samples = load_test_split(args.data)
    random.Random(0).shuffle(samples)
    groups = [samples[i : i + args.rows] for i in range(0, len(samples) - args.rows + 1, args.rows)]
    labels = [[s["label"] for s in g] for g in groups]
    settings = {"threads": args.threads}
    runs, context = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        quiet = wait_for_quiet(max_wait_s=args.max_wait)
        for mode in ("off", "on"):
            if mode == "on":
                settings["degrade_to"] = context["degrade_to"]
            process, base = start_server(args.store, Path(tmp) / f"serve-{mode}.log", settings=settings)
            port = int(base.rsplit(":", 1)[1])
            payloads = [request_bytes(port, g) for g in groups]
            try:
                with CpuWatch((process.pid,)) as watch:
                    if mode == "off":
                        context["degrade_to"], context["default_point"] = cheapest_point(base, args.model)
                        context["degrade_to"] = args.degrade_to or context["degrade_to"]
                        asyncio.run(closed_loop(port, payloads, args.concurrency, 2.0))  # warm the connections
                        context["sustainable"] = asyncio.run(closed_loop(port, payloads, args.concurrency, 8.0))
                        print(f"sustainable rate: {context['sustainable']['rate_per_s']:.0f} req/s")
                    rate = args.factor * context["sustainable"]["rate_per_s"]
                    runs[mode] = asyncio.run(open_loop(port, payloads, labels, rate, args.seconds))
                runs[mode]["foreign_cpu_share"] = watch.foreign_share
                print(mode, json.dumps({k: v for k, v in runs[mode].items() if k != "operating_points"}))
            finally:
                stop_server(process)

    header = ["degrade", "calls", "200", "503", "answered", "p50 ms", "p99 ms", "accuracy", "rows degraded"]
    header.append("their accuracy")
    rows = []
    for mode, run in runs.items():
        rows.append([
            f"{mode}" + (f" ({context['degrade_to']})" if mode == "on" else ""),
            run["sent"], run["answered_200"], run["statuses"].get("503", 0), f"{100 * run['answered_share']:.1f}%",
            f"{run['p50_ms']:.0f}", f"{run['p99_ms']:.0f}", f"{100 * run['accuracy']:.2f}%", run["degraded"],
            "" if run["degraded_accuracy"] is None else f"{100 * run['degraded_accuracy']:.2f}%",
        ])  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    write_result(
        args.out,
        {
            "figure": "degrade",
            "settings": {**settings, "factor": args.factor, "burst_seconds": args.seconds, "rows": args.rows},
            "quiet_before": quiet,
            **context,
            "runs": runs,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
