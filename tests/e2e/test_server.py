"""A real ``dynfuse serve`` (uvicorn) in a subprocess on a loopback port."""

from __future__ import annotations

import base64
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import worker_pids
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def test_serves_over_real_http_and_prints_where_the_docs_are(server_process, samples):
    process, base = server_process()
    sample = samples[0]
    response = httpx.post(
        f"{base}/v1/classify",
        files={"image": ("s.png", sample["png"], "image/png")},
        data={"text": sample["text"]},
        timeout=10,
    )
    assert response.status_code == 200
    experts = {e["name"] for e in httpx.get(f"{base}/v1/models/shapes", timeout=5).json()["experts"]}
    assert response.json()["route"]["expert"] in experts
    assert httpx.get(f"{base}/docs", timeout=5).status_code == 200
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert f"API docs at {base}/docs" in output


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_in_flight_requests_then_exits_0(server_process, samples, workers):
    # A long batch delay keeps requests in flight when the signal arrives.
    process, base = server_process(max_batch_delay_ms=1000, max_batch_size=64, workers=workers)
    pair = {"image": base64.b64encode(samples[0]["png"]).decode(), "text": samples[0]["text"]}

    # One client, made before the clock starts: each httpx.post builds its own, which loads the CA bundle
    # (0.3 s here, 0.8 s for eight at once), and a request not yet connected at SIGTERM is refused.
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(client.post, f"{base}/v1/classify", json=pair) for _ in range(8)]
        # All eight admitted and waiting in the batcher (not a fixed sleep: on a busy machine 0.3 s
        # was not always enough for eight connections to be accepted).
        deadline = time.monotonic() + 10
        while inflight(base) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in in_flight]

    assert [r.status_code for r in responses] == [200] * 8
    assert process.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)


def inflight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dynfuse_inflight_requests":
                return sample.value
    return 0.0


def test_workers_share_the_port_and_report_summed_metrics(server_process, samples):
    process, base = server_process(workers=2)
    assert len(worker_pids(process.pid)) == 2
    pairs = [{"image": base64.b64encode(s["png"]).decode(), "text": s["text"]} for s in samples[:12]]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda pair: httpx.post(f"{base}/v1/classify", json=pair, timeout=30), pairs))
    assert [r.status_code for r in responses] == [200] * 12

    scraped = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text)
        for sample in family.samples
    }
    model = responses[0].json()["model"]
    labels = (("key", "anonymous"), ("model", model), ("protocol", "http"), ("status", "200"))
    assert scraped[("dynfuse_requests_total", labels)] == 12
    assert scraped[("dynfuse_compute_madds_total", (("model", model),))] == sum(
        r.json()["compute"]["madds"] for r in responses
    )
    assert scraped[("dynfuse_inflight_requests", (("model", model),))] == 0
    [info] = [value for (name, _), value in scraped.items() if name == "dynfuse_model_info"]
    assert info == 1

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_serve_starts_one_worker_per_core_by_default(server_process, samples):
    from service.server import available_cores

    process, base = server_process(workers=0)  # DYNFUSE_WORKERS=0, as when it is not set
    assert len(worker_pids(process.pid)) == (available_cores() if available_cores() > 1 else 0)
    pair = {"image": base64.b64encode(samples[0]["png"]).decode(), "text": samples[0]["text"]}
    assert httpx.post(f"{base}/v1/classify", json=pair, timeout=30).status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_serve_refuses_an_empty_store_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--store", str(tmp_path / "empty"), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no model in store" in result.stderr
    assert "build-default" in result.stderr
