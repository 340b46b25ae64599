"""A gRPC load generator for bench/grpc_throughput.py, the counterpart of wrk for ``ModelInfer``: ``concurrency``
calls in flight on one channel (one HTTP/2 connection, as a gRPC client holds one), each a pre-serialized
ModelInferRequest sent as bytes (no protobuf work per call here), rotating, for ``seconds``. Prints one line
``JSON {...}`` in wrk_classify.lua's shape: requests, duration, errors by status code, latency percentiles.

    python -m bench.grpc_load HOST:PORT BODIES.bin --concurrency 32 --seconds 10

BODIES.bin: records of "<length>\\n" then that many bytes (one serialized request each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def read_bodies(path: Path) -> list[bytes]:
    bodies, data, offset = [], path.read_bytes(), 0
    while offset < len(data):
        end = data.index(b"\n", offset)
        length = int(data[offset:end])
        bodies.append(data[end + 1 : end + 1 + length])
        offset = end + 1 + length
    return bodies


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def load(target: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out
        await channel.channel_ready()
        latencies: list[float] = []
        errors: Counter = Counter()
        stop = time.monotonic() + seconds

        async def worker(start: int) -> None:
            index = start
            while time.monotonic() < stop:
                body = bodies[index % len(bodies)]
                index += 1
                began = time.perf_counter()
                try:
                    await call(body, timeout=30)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - began)

        started = time.monotonic()
        await asyncio.gather(*(worker(i * len(bodies) // concurrency) for i in range(concurrency)))
        duration = time.monotonic() - started
    ordered = sorted(latencies)
    return {
        "generator": "grpc.aio",
        "requests": len(latencies) + sum(errors.values()),
        "duration_s": duration,
        "errors": dict(errors),
        "latency_ms": {
            "mean": 1000 * sum(ordered) / max(len(ordered), 1),
            **{f"p{q}": 1000 * percentile(ordered, q) for q in (50, 95, 99)},
            "max": 1000 * (ordered[-1] if ordered else float("nan")),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(load(args.target, read_bodies(args.bodies), args.concurrency, args.seconds))
    print("JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
