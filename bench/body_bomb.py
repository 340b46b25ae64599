"""Over-limit bodies cost no more than their own bytes: a real ``dynfuse serve`` (default settings) gets bodies
just under the 10 MiB body limit whose element counts are far over DYNFUSE_MAX_BATCH_INPUTS, and must answer
each with a 413, fast, without its memory growing, while it keeps serving other clients.

The bodies (each about 9.5 MiB):

- ``batch_empty_inputs``: ``{"inputs":[{},{},...]}`` to /v1/classify/batch (3.3 million empty inputs);
- ``v2_json_elements``: a /v2 infer of one BYTES tensor whose JSON ``data`` holds 1.6 million empty strings;
- ``v2_binary_elements``: the same tensor as binary data: 2.5 million 4-byte lengths of empty elements.

For each: the time from the first byte sent to the whole answer read, its status, and the server's resident
memory: ``VmRSS`` before, and the peak (``VmHWM``, reset through /proc/<pid>/clear_refs before the request)
minus it. Then ``--concurrent`` (8) batch bombs at once while one client keeps sending ordinary requests
(JSON, a shipped example): the bombs' times, the ordinary requests' statuses and latencies meanwhile, and the
peak memory growth.

    python -m bench.body_bomb --store store        # -> bench/results/body_bomb.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

from bench.common import (
    DEFAULT_STORE,
    RESULTS,
    CpuWatch,
    percentile,
    proc_status,
    start_server,
    stop_server,
    write_result,
)
from export.store import resolve

TARGET_BYTES = int(9.5 * (1 << 20))


def batch_bomb() -> tuple[str, bytes, dict]:
    count = (TARGET_BYTES - len(b'{"inputs":[]}')) // 3
    body = b'{"inputs":[' + b",".join([b"{}"] * count) + b"]}"
    return "/v1/classify/batch", body, {"content-type": "application/json"}


def v2_json_bomb(model: str) -> tuple[str, bytes, dict]:
    head = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":['
    count = (TARGET_BYTES - len(head) - 4) // 3
    body = head + b",".join([b'""'] * count) + b"]}]}"
    return f"/v2/models/{model}/infer", body, {"content-type": "application/json"}


def v2_binary_bomb(model: str) -> tuple[str, bytes, dict]:
    elements = struct.pack("<I", 0) * (TARGET_BYTES // 4)
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(elements)}}
            ]
        }
    ).encode()
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return f"/v2/models/{model}/infer", header + elements, headers


def send(base: str, path: str, body: bytes, headers: dict, timeout: float = 120.0) -> tuple[int, float]:
    """(status, seconds from the first byte sent to the whole answer read)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def one_bomb(pid: int, base: str, name: str, request: tuple[str, bytes, dict], repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        before = proc_status((pid,))
        reset_peak(pid)
        status, seconds = send(base, *request)
        after = proc_status((pid,))
        runs.append({
            "status": status,
            "seconds": round(seconds, 4),
            "rss_before_mib": before["VmRSS"],
            "peak_growth_mib": round(after["VmHWM"] - before["VmRSS"], 1),
            "rss_after_mib": after["VmRSS"],
        })  # fmt: skip
    print(f"{name}: " + ", ".join(f"{r['status']} in {r['seconds']:.3f} s, +{r['peak_growth_mib']} MiB" for r in runs))
    return {"body_bytes": len(request[1]), "runs": runs}


def concurrent(pid: int, base: str, request, bombs: int, pair: dict) -> dict:
    """``bombs`` at once, while one client sends ordinary requests from before the first to after the last."""
    ordinary = json.dumps(pair).encode(), {"content-type": "application/json"}
    baseline = [send(base, "/v1/classify", *ordinary)[1] for _ in range(20)]
    statuses, latencies, results = [], [], []
    done = threading.Event()

    def prober():
        while not done.is_set():
            status, seconds = send(base, "/v1/classify", *ordinary)
            statuses.append(status)
            latencies.append(seconds)

    def bomber():
        results.append(send(base, *request))

    before = proc_status((pid,))
    reset_peak(pid)
    probe = threading.Thread(target=prober)
    probe.start()
    time.sleep(0.2)  # the prober is running before the first bomb
    started = time.perf_counter()
    threads = [threading.Thread(target=bomber) for _ in range(bombs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    time.sleep(0.2)
    done.set()
    probe.join()
    after = proc_status((pid,))
    summary = {
        "bombs": bombs,
        "bomb_statuses": sorted(status for status, _ in results),
        "bomb_seconds_max": round(max(seconds for _, seconds in results), 3),
        "wall_seconds": round(wall, 3),
        "peak_growth_mib": round(after["VmHWM"] - before["VmRSS"], 1),
        "ordinary": {
            "sent": len(statuses),
            "non_200": sum(status != 200 for status in statuses),
            "p50_ms": round(1000 * percentile(latencies, 50), 1),
            "max_ms": round(1000 * max(latencies), 1),
            "baseline_p50_ms": round(1000 * percentile(baseline, 50), 1),
        },
    }
    print(f"{bombs} at once: {summary}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--repeats", type=int, default=3, help="each single bomb, this many times")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "body_bomb.json")
    args = parser.parse_args(argv)

    version = resolve(args.store)
    model = version.parent.name
    manifest = json.loads((version / "model.json").read_text())
    example = manifest["examples"][0]
    pair = {"image": base64.b64encode((version / example["file"]).read_bytes()).decode(), "text": example["text"]}
    requests = {
        "batch_empty_inputs": batch_bomb(),
        "v2_json_elements": v2_json_bomb(model),
        "v2_binary_elements": v2_binary_bomb(model),
    }
    with tempfile.TemporaryDirectory(prefix="dynfuse-bomb-") as scratch:
        process, base = start_server(args.store, Path(scratch) / "server.log")
        try:
            with CpuWatch((process.pid,)) as watch:
                single = {name: one_bomb(process.pid, base, name, r, args.repeats) for name, r in requests.items()}
                together = concurrent(process.pid, base, requests["batch_empty_inputs"], args.concurrent, pair)
            alive = process.poll() is None
        finally:
            stop_server(process)
    write_result(
        args.out,
        {
            "model": f"{model} v{version.name}",
            "settings": "default limits (DYNFUSE_MAX_BODY_BYTES 10 MiB, DYNFUSE_MAX_BATCH_INPUTS 64), one worker",
            "single": single,
            "concurrent": together,
            "server_alive_after": alive,
            "load_average": os.getloadavg(),
            "foreign_cpu_share": watch.foreign_share,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
