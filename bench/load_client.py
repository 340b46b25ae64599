"""A closed-loop HTTP load generator (the fallback when ``wrk`` is not installed): ``concurrency`` clients,
each sending the next body as soon as its previous answer arrives, until ``--duration`` seconds or
``--max-requests`` requests. Prints one ``JSON {...}`` line in the shape of ``bench/wrk_classify.lua``.

It runs as its own process (``bench/http_load.py`` starts it), so its CPU is not the server's; on a
2-core machine it still competes with the server for the cores, which wrk does far less.

    python -m bench.load_client --url http://127.0.0.1:8000/v1/classify --bodies bodies.jsonl -c 8 -d 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

from bench.common import percentile


async def run(url: str, bodies: list[bytes], concurrency: int, duration_s: float, max_requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    received = 0
    order = itertools.cycle(range(len(bodies)))
    deadline = time.perf_counter() + duration_s
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}

    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def worker() -> None:
            nonlocal issued, received
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                body = bodies[next(order)]
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.TimeoutException:
                    errors["timeout"] += 1
                    continue
                except httpx.ConnectError:
                    errors["connect"] += 1
                    continue
                except httpx.TransportError:
                    errors["read"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                received += len(response.content)
                if response.status_code >= 400:
                    errors["status"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = [1000 * v for v in latencies]
    return {
        "generator": "python-httpx",
        "requests": len(latencies),
        "duration_s": elapsed,
        "bytes_read": received,
        "errors": errors,
        "latency_ms": {
            "mean": sum(ms) / len(ms) if ms else float("nan"),
            **{f"p{q}": percentile(ms, q) for q in (50, 95, 99)},
            "max": max(ms, default=float("nan")),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", required=True, help="one JSON request body per line")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-requests", type=int, default=100_000)
    args = parser.parse_args(argv)
    with open(args.bodies, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    result = asyncio.run(run(args.url, bodies, args.concurrency, args.duration, args.max_requests))
    print("JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
