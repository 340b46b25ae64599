"""``dynfuse serve --workers 2``: each worker audits the answers it gave, and /metrics reports the audits, their
compute and the safety series summed (counters) or combined (gauges) over both workers."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL_NAME, worker_pids
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, key), v in samples.items() if n == name and labels.items() <= dict(key).items())


def test_two_workers_audit_their_own_answers_and_metrics_sum_them(server_process, samples):
    process, base = server_process(workers=2, audit_rate=1.0, min_confidence=0.0)  # the router's picks alone
    assert len(worker_pids(process.pid)) == 2
    full = httpx.get(f"{base}/v1/models/{MODEL_NAME}", timeout=10).json()["full_expert"]

    def classify(sample):  # a new connection each: the kernel spreads them over both workers
        pair = {"image": base64.b64encode(sample["png"]).decode(), "text": sample["text"]}
        response = httpx.post(f"{base}/v1/classify", json=pair, headers={"connection": "close"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(classify, samples[:60]))
    cheaper = [a for a in answers if a["route"]["decided_by"] == "router" and a["route"]["expert"] != full]
    assert cheaper, "the tiny model routes some pairs to cheaper experts"

    deadline = time.monotonic() + 60
    seen = {}
    while time.monotonic() < deadline:
        seen = metrics(base)
        judged = total(seen, "dynfuse_audits_total", outcome="agreed") + total(
            seen, "dynfuse_audits_total", outcome="disagreed"
        )
        if judged >= len(cheaper):
            break
        time.sleep(0.1)
    assert judged == len(cheaper)  # every audited answer once, whichever worker gave it
    assert total(seen, "dynfuse_audits_total", outcome="dropped") == 0

    # Each audit ran the full path on its request once: what a request forced onto it costs.
    pair = {"image": base64.b64encode(samples[0]["png"]).decode(), "text": samples[0]["text"], "route": full}
    full_madds = httpx.post(f"{base}/v1/classify", json=pair, timeout=30).json()["compute"]["madds"]
    assert total(seen, "dynfuse_audit_madds_total", model=MODEL_NAME) == len(cheaper) * full_madds
    # The gauges are combined, not summed: 0 or 1 for the guard, the validated figures as they are.
    assert total(seen, "dynfuse_guard_active", model=MODEL_NAME) in (0.0, 1.0)
    manifest_points = httpx.get(f"{base}/v1/models/{MODEL_NAME}", timeout=10).json()["operating_points"]
    for point in manifest_points:
        validated = total(seen, "dynfuse_validated_agreement", operating_point=point["name"])
        assert 0.0 <= validated <= 1.0
