"""Model lifecycle under load: how long a version swap takes, the p99 latency during swaps against the p99
without one (in the same run, same server, same traffic), and the memory a second model costs.

A copy of the store is served by a real ``dynfuse serve`` (one worker). Closed-loop clients send the model's
shipped examples (JSON, base64 image + text) all along. Phases:

1. ``baseline``: traffic only.
2. ``swaps``: the same traffic while ``--swaps`` new versions (copies of the served one, published into the
   store copy) are loaded one after the other through ``POST /v2/repository/models/{name}/load``. The window of
   a swap is from the load request to its answer (verify + warm-up beside the old version + swap); the
   requests that started inside a window are the "during a swap" sample.
3. ``memory``: the server's RSS before a second model (the same files under another name) is loaded, after
   it is loaded and warm, and after it is unloaded again.

Every answer must be a 200 (the figure ``non_200`` says otherwise).

    python -m bench.model_swap --store store            # -> bench/results/model_swap.json
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx

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


def publish(store: Path, name: str, source: Path, version: str) -> None:
    """A copy of ``source`` appears in the store as ``name``/``version`` (what an export beside the server does)."""
    target = store / name / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "model.json").read_text())
    manifest.update(name=name, version=version)
    (target / "model.json").write_text(json.dumps(manifest))


def examples(version_dir: Path) -> list[dict]:
    manifest = json.loads((version_dir / "model.json").read_text())
    pairs = [
        {"image": base64.b64encode((version_dir / e["file"]).read_bytes()).decode(), "text": e["text"]}
        for e in manifest.get("examples", [])
    ]
    if not pairs:
        raise SystemExit(f"{version_dir} ships no examples: export it with its data")
    return pairs


class Traffic:
    """Closed-loop clients; each answer recorded as (start, seconds, status)."""

    def __init__(self, base: str, pairs: list[dict], concurrency: int):
        self.base, self.pairs, self.concurrency = base, pairs, concurrency
        self.records: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            n = index
            while not self._stop.is_set():
                pair = self.pairs[n % len(self.pairs)]
                n += self.concurrency
                started = time.monotonic()
                try:
                    status = client.post("/v1/classify", json=pair).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.records.append((started, time.monotonic() - started, status))

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        with self._lock:
            return [r for r in self.records if start <= r[0] < end]


def latency(records) -> dict:
    seconds = [r[1] for r in records]
    return {
        "requests": len(records),
        "non_200": sum(1 for r in records if r[2] != 200),
        "p50_ms": round(1000 * percentile(seconds, 50), 2),
        "p99_ms": round(1000 * percentile(seconds, 99), 2),
        "max_ms": round(1000 * max(seconds), 2) if seconds else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", help="default: the store's only model")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=3.0, help="traffic between two swaps")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_swap.json")
    args = parser.parse_args()

    source = resolve(args.store, args.model)
    name = source.parent.name
    pairs = examples(source)
    with tempfile.TemporaryDirectory(prefix="dynfuse-swap-") as scratch:
        store = Path(scratch) / "store"
        publish(store, name, source, "1")
        # Loads and unloads are model control calls: off unless asked for (loopback only, so no admin key needed).
        process, base = start_server(store, Path(scratch) / "server.log", settings={"model_control": "explicit"})
        try:
            result = measure(args, store, name, source, pairs, process, base)
        finally:
            stop_server(process)
    write_result(args.out, {"model": name, "source": str(source), "concurrency": args.concurrency, **result})


def measure(args, store: Path, name: str, source: Path, pairs, process, base: str) -> dict:
    admin = httpx.Client(base_url=base, timeout=300)
    with CpuWatch((process.pid,)) as watch, Traffic(base, pairs, args.concurrency) as traffic:
        time.sleep(2.0)  # warm-up: connections open, pools at size (not measured)
        baseline_start = time.monotonic()
        time.sleep(args.baseline_s)
        baseline_end = time.monotonic()
        windows, swaps = [], []
        for version in range(2, 2 + args.swaps):
            publish(store, name, source, str(version))
            started = time.monotonic()
            answer = admin.post(f"/v2/repository/models/{name}/load")
            ended = time.monotonic()
            assert answer.status_code == 200, answer.text
            windows.append((started, ended))
            swaps.append({"version": str(version), "seconds": round(ended - started, 3), **answer.json()})
            time.sleep(args.settle_s)
        after_end = time.monotonic()
    baseline = traffic.between(baseline_start, baseline_end)
    during = [r for start, end in windows for r in traffic.between(start, end)]
    swap_phase = traffic.between(baseline_end, after_end)
    last = admin.post("/v1/classify", json=pairs[0]).json()["model_version"]

    rss_before = proc_status((process.pid,))["VmRSS"]
    publish(store, f"{name}_b", source, "1")
    loaded = admin.post(f"/v2/repository/models/{name}_b/load")
    assert loaded.status_code == 200, loaded.text
    for pair in pairs:  # the second model's batcher and runtime used once, as traffic would
        admin.post("/v1/classify", json={**pair, "model": f"{name}_b"})
    rss_loaded = proc_status((process.pid,))["VmRSS"]
    admin.post(f"/v2/repository/models/{name}_b/unload")
    rss_unloaded = proc_status((process.pid,))["VmRSS"]
    return {
        "swap_seconds": [s["seconds"] for s in swaps],
        "swaps": swaps,
        "served_version_after": last,
        "baseline": latency(baseline),
        "during_swaps": latency(during),
        "whole_swap_phase": latency(swap_phase),
        "memory_mib": {
            "rss_one_model": rss_before,
            "rss_second_model_loaded": rss_loaded,
            "second_model_costs": round(rss_loaded - rss_before, 1),
            "rss_after_unloading_it": rss_unloaded,
        },
        "foreign_cpu_share": watch.foreign_share,
    }


if __name__ == "__main__":
    main()
