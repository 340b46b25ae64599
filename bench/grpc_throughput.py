"""gRPC against HTTP: the Open Inference Protocol over gRPC beside the same protocol over HTTP, with JSON and with
binary tensor data, and /v1's JSON for reference. One ``dynfuse serve --grpc-port`` (one process), the held-out
test split's pairs one per request, rotating, the same concurrency for every transport, the transports taking
turns in rounds of the same length (the order rotates from round to round), after a warm-up of each.

Load: wrk with pre-built bodies for HTTP (bench/wrk_v2.lua, bench/wrk_classify.lua) and bench/grpc_load.py for
gRPC (grpc.aio, pre-serialized requests on one channel, as a gRPC client holds one). Besides requests per second,
each round records the server's CPU time per request (what the transport costs the server; contention moves it
less than throughput), the load generator's CPU, the load average and what other processes used.

    python -m bench.grpc_throughput [--rounds 3] [--seconds 10] [--concurrency 32] [--profile]

``--profile`` then records a py-spy profile of the server under the gRPC load (bench/results/profile_c32_grpc.*).
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
import urllib.request
from pathlib import Path

from bench.common import (
    DEFAULT_STORE,
    REPO,
    RESULTS,
    CpuWatch,
    cpu_seconds,
    free_port,
    load_test_split,
    markdown_table,
    server_processes,
    start_server,
    stop_server,
    wait_for_quiet,
    write_result,
)

TRANSPORTS = ("grpc", "http_v2_binary", "http_v2_json", "http_v1_json")
LABELS = {
    "grpc": "gRPC ModelInfer (raw tensors)",
    "http_v2_binary": "HTTP /v2 infer, binary tensor data",
    "http_v2_json": "HTTP /v2 infer, JSON (base64 image)",
    "http_v1_json": "HTTP /v1/classify, JSON (base64 image), for reference",
}


# -- the bodies ------------------------------------------------------------------------------------
def _v2_json(sample: dict) -> bytes:
    image = base64.b64encode(sample["png"]).decode()
    inputs = [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]},
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [sample["text"]]},
    ]
    return json.dumps({"inputs": inputs}).encode()


def _bytes_tensor(element: bytes) -> bytes:
    return len(element).to_bytes(4, "little") + element


def _v2_binary(sample: dict) -> tuple[int, bytes]:
    raw = [_bytes_tensor(sample["png"]), _bytes_tensor(sample["text"].encode())]
    inputs = [
        {"name": name, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}
        for name, data in zip(("image", "text"), raw, strict=True)
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return len(header), header + b"".join(raw)


def _grpc(sample: dict, model: str) -> bytes:
    from service.grpc.protocol import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    for name, element in (("image", sample["png"]), ("text", sample["text"].encode())):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(_bytes_tensor(element))
    return request.SerializeToString()


def write_bodies(samples: list[dict], model: str, work: Path) -> dict[str, Path]:
    files = {name: work / f"{name}.bodies" for name in TRANSPORTS}
    with files["http_v1_json"].open("w") as out:
        for s in samples:
            out.write(json.dumps({"image": base64.b64encode(s["png"]).decode(), "text": s["text"]}) + "\n")
    with files["http_v2_json"].open("wb") as out:
        for s in samples:
            body = _v2_json(s)
            out.write(f"0 {len(body)}\n".encode() + body)
    with files["http_v2_binary"].open("wb") as out:
        for s in samples:
            header_length, body = _v2_binary(s)
            out.write(f"{header_length} {len(body)}\n".encode() + body)
    with files["grpc"].open("wb") as out:
        for s in samples:
            body = _grpc(s, model)
            out.write(f"{len(body)}\n".encode() + body)
    return files


# -- one round of one transport --------------------------------------------------------------------
def drive(transport: str, base: str, grpc_target: str, bodies: Path, model: str, concurrency: int, seconds: float):
    """Run the load generator; (its JSON line, its CPU seconds)."""
    if transport == "grpc":
        command = [sys.executable, "-m", "bench.grpc_load", grpc_target, str(bodies),
                   "--concurrency", str(concurrency), "--seconds", f"{seconds:g}"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
    else:
        lua, path = {
            "http_v1_json": ("wrk_classify.lua", "/v1/classify"),
            "http_v2_json": ("wrk_v2.lua", f"/v2/models/{model}/infer"),
            "http_v2_binary": ("wrk_v2.lua", f"/v2/models/{model}/infer"),
        }[transport]
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s",
                   str(REPO / "bench" / lua), base]  # fmt: skip
        env = {"DYNFUSE_BENCH_BODIES": str(bodies), "DYNFUSE_BENCH_PATH": path, "PATH": "/usr/bin:/bin"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{transport} load failed ({done.returncode}): {done.stdout[-800:]} {done.stderr[-800:]}")
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(lines[-1][5:]), client_cpu


def answered(base: str) -> dict[str, float]:
    """dynfuse_requests_total by protocol and status, from the server's /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dynfuse_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            protocol = labels.split('protocol="', 1)[1].split('"', 1)[0]
            status = labels.split('status="', 1)[1].split('"', 1)[0]
            counts[f"{protocol} {status}"] = counts.get(f"{protocol} {status}", 0.0) + float(value)
    return counts


def one_round(transport, base, grpc_target, bodies, model, concurrency, seconds, pids) -> dict:
    server_before, counts_before, load_before = cpu_seconds(pids), answered(base), os.getloadavg()[0]
    with CpuWatch(pids) as watch:
        load, client_cpu = drive(transport, base, grpc_target, bodies, model, concurrency, seconds)
    server_cpu, counts_after = cpu_seconds(pids) - server_before, answered(base)
    protocol = "grpc" if transport == "grpc" else "http"
    ok = counts_after.get(f"{protocol} 200", 0.0) - counts_before.get(f"{protocol} 200", 0.0)
    not_ok = sum(v - counts_before.get(k, 0.0) for k, v in counts_after.items() if k.startswith(protocol)) - ok
    errors = sum(load["errors"].values()) if isinstance(load["errors"], dict) else 0
    return {
        "requests_per_second": load["requests"] / load["duration_s"],
        "latency_ms": load["latency_ms"],
        "client_errors": errors,
        "server_answered_200": ok,
        "server_answered_other": not_ok,
        "server_cpu_ms_per_request": 1000 * server_cpu / max(ok, 1),
        "server_cpu_cores": server_cpu / load["duration_s"],
        "client_cpu_cores": client_cpu / load["duration_s"],
        "foreign_cpu_share": watch.foreign_share,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a data set whose test split gives the bodies; default: the held-out set of bench/peer_compare.py "
        "(build/heldout-s<seed>-<size>px, made if missing)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each transport once per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each transport's load in a round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "grpc_throughput.json")
    parser.add_argument("--profile", action="store_true", help="py-spy the server under gRPC load after the rounds")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    from export.store import load_model

    model = load_model(args.store).name
    from bench.peer_compare import HELD_OUT_SEED, held_out_data

    args.data = held_out_data(args.store, args.data, HELD_OUT_SEED)
    samples = load_test_split(args.data)
    work = Path(tempfile.mkdtemp(prefix="dynfuse-bench-grpc-"))
    files = write_bodies(samples, model, work)
    print(f"{len(samples)} test-split pairs, one per request, {args.concurrency} in flight; model {model}")

    quiet = wait_for_quiet(max_wait_s=args.max_wait)
    grpc_port = free_port()
    process, base = start_server(args.store, work / "server.log", settings={"grpc_port": grpc_port})
    grpc_target = f"127.0.0.1:{grpc_port}"
    pids = server_processes(process.pid)
    rounds: dict[str, list[dict]] = {name: [] for name in TRANSPORTS}
    loadavg_start = os.getloadavg()
    try:
        for transport in TRANSPORTS:  # warm-up, not recorded
            drive(transport, base, grpc_target, files[transport], model, args.concurrency, 3)
        with CpuWatch(pids) as watch:
            for index in range(args.rounds):
                order = TRANSPORTS[index % len(TRANSPORTS) :] + TRANSPORTS[: index % len(TRANSPORTS)]
                for transport in order:
                    result = one_round(
                        transport, base, grpc_target, files[transport], model, args.concurrency, args.seconds, pids
                    )
                    rounds[transport].append(result)
                    print(f"round {index + 1} {transport}: {result['requests_per_second']:,.0f} req/s, "
                          f"server {result['server_cpu_ms_per_request']:.2f} ms CPU/request, "
                          f"load {result['loadavg_1m_before']:.1f}")  # fmt: skip
        profile = None
        if args.profile:
            from bench.profile_report import record_profile

            def grpc_load(seconds: float) -> dict:
                return drive("grpc", base, grpc_target, files["grpc"], model, args.concurrency, seconds)[0]

            profile = record_profile(process.pid, args.seconds, "_grpc", grpc_load)
    finally:
        stop_server(process)
        shutil.rmtree(work, ignore_errors=True)
    loadavg_end = os.getloadavg()

    def median(transport: str, key, default=0.0):
        values = [key(r) for r in rounds[transport]]
        return statistics.median(values) if values else default

    summary = {
        name: {
            "requests_per_second": median(name, lambda r: r["requests_per_second"]),
            "p50_ms": median(name, lambda r: r["latency_ms"]["p50"]),
            "p99_ms": median(name, lambda r: r["latency_ms"]["p99"]),
            "server_cpu_ms_per_request": median(name, lambda r: r["server_cpu_ms_per_request"]),
            "client_cpu_cores": median(name, lambda r: r["client_cpu_cores"]),
            "errors": sum(r["client_errors"] + r["server_answered_other"] for r in rounds[name]),
        }
        for name in TRANSPORTS
    }
    reference = summary["http_v2_json"]["requests_per_second"]
    rows = [
        [
            LABELS[name],
            f"{s['requests_per_second']:,.0f}",
            f"{s['requests_per_second'] / reference:.2f}",
            f"{s['p50_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            f"{s['server_cpu_ms_per_request']:.2f}",
            f"{s['client_cpu_cores']:.2f}",
            int(s["errors"]),
        ]
        for name, s in summary.items()
    ]
    header = ["transport", "req/s (median)", "of /v2 JSON", "p50 ms", "p99 ms", "server CPU ms/req", "client cores",
              "errors"]  # fmt: skip
    print(markdown_table(header, rows))
    print(
        f"\nload average {loadavg_start[0]:.1f} at the start, {loadavg_end[0]:.1f} at the end; other processes used "
        f"{watch.foreign_share:.0%} of the CPU ({'contended' if watch.foreign_share > 0.15 else 'quiet'})"
    )
    write_result(
        args.out,
        {
            "figure": "gRPC against HTTP (Open Inference Protocol)",
            "model": model,
            "data": str(args.data),
            "samples": len(samples),
            "concurrency": args.concurrency,
            "seconds_per_round": args.seconds,
            "foreign_cpu_share_before": quiet,
            "foreign_cpu_share": watch.foreign_share,
            "contended": watch.foreign_share > 0.15,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "summary": summary,
            "rounds": rounds,
            "profile": profile,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
