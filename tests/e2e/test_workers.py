"""``dynfuse serve --workers 2`` when a worker dies: uvicorn's supervisor replaces it, the replacement
serves the version its sibling serves (not a newer one exported meanwhile), the other worker keeps
serving, no request hangs, and the in-flight gauge forgets the dead worker's requests."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import worker_pids
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def inflight(base: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "dynfuse_inflight_requests":
                return sample.value
    raise AssertionError("no dynfuse_inflight_requests in /metrics")


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def publish_version_2(store: Path) -> None:
    """What an export running beside the server does: a newer version appears in the store."""
    newer = store / "shapes" / "2"
    shutil.copytree(store / "shapes" / "1", newer)
    manifest = json.loads((newer / "model.json").read_text())
    manifest["version"] = "2"
    (newer / "model.json").write_text(json.dumps(manifest))


def test_a_killed_worker_is_replaced_on_the_same_version_and_its_requests_leave_the_gauge(
    server_process, store_copy, samples
):
    # A long batch delay keeps requests in flight long enough to kill a worker under them.
    process, base = server_process(store=store_copy, workers=2, max_batch_delay_ms=1000, max_batch_size=64)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    publish_version_2(store_copy)
    pair = {"image": base64.b64encode(samples[0]["png"]).decode(), "text": samples[0]["text"]}

    def classify(_):
        try:
            return httpx.post(f"{base}/v1/classify", json=pair, timeout=30).status_code
        except httpx.TransportError as error:  # the killed worker's own requests: reset, not hung
            return type(error).__name__

    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(classify, i) for i in range(8)]
        deadline = time.monotonic() + 0.7
        while inflight(base) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        baseline = {pid: sockets(pid) for pid in workers}
        victim = max(workers, key=baseline.get)
        assert baseline[victim] > min(baseline.values()) or len(set(baseline.values())) == 1
        os.kill(victim, signal.SIGKILL)
        outcomes = [future.result(timeout=40) for future in pending]  # none hangs
        # The kernel may have handed all eight connections to the victim: new ones show the other serving.
        after_kill = list(pool.map(classify, range(4)))

    assert all(o == 200 or o in ("RemoteProtocolError", "ReadError") for o in outcomes), outcomes
    assert after_kill == [200] * 4, after_kill  # the other worker kept serving
    assert inflight(base) == 0  # the dead worker's requests are not counted for ever

    deadline = time.monotonic() + 60
    replacement = None
    while time.monotonic() < deadline:
        now = worker_pids(process.pid)
        fresh = [pid for pid in now if pid not in workers]
        if len(now) == 2 and fresh and rss_kib(fresh[0]) > 0.8 * rss_kib(next(p for p in now if p != fresh[0])):
            replacement = fresh[0]
            break
        time.sleep(0.2)
    assert replacement is not None, "uvicorn did not replace the killed worker within 60 s"
    environment = Path(f"/proc/{replacement}/environ").read_bytes().split(b"\0")
    assert b"DYNFUSE_MODEL_VERSION=1" in environment

    time.sleep(1.0)  # the replacement accepts connections once warm
    versions = set()
    with ThreadPoolExecutor(8) as pool:
        for response in pool.map(lambda _: httpx.post(f"{base}/v1/classify", json=pair, timeout=30), range(24)):
            assert response.status_code == 200
            versions.add(response.json()["model_version"])
    assert versions == {"1"}  # version 2 is in the store, but the workers stay on the version they started on
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_a_load_request_to_one_worker_swaps_every_worker(server_process, store_copy):
    process, base = server_process(store=store_copy, workers=2, log_level="info", model_control="explicit")
    publish_version_2(store_copy)
    loaded = httpx.post(f"{base}/v2/repository/models/shapes/load", timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["version"] == "2"

    def version_on_a_new_connection() -> str:  # a new connection may reach either worker
        answer = httpx.post(f"{base}/v1/classify", json={"text": "a red circle"}, headers={"connection": "close"})
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]

    deadline = time.monotonic() + 60
    streak = 0
    while streak < 30 and time.monotonic() < deadline:
        streak = streak + 1 if version_on_a_new_connection() == "2" else 0
    assert streak >= 30, "some worker still answers with version 1"
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=60)[0]
    # Both workers swapped: the one that got the request, and the other one following the shared file.
    assert log.count("model shapes: serving version 2 (was 1)") == 2, log[-3000:]
