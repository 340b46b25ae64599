"""The Ray Serve engine on a local cluster: an ingress and one deployment per expert answer exactly what the
single-process server answers, with the same error bodies, and every replica reports the dynfuse metrics
through Ray's agent, which a real Prometheus with docker/prometheus/ray.yml reads under the dashboard's names.

One cluster for the module (it takes 20-60 s to start on a busy 2-core machine), torn down at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dashboard_queries as dq
import httpx
import pytest
import yaml
from conftest import MODEL_NAME, b64, free_port, require_tool, wait_ready
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from ray_cluster import ray_application

# Generous: the session fixtures train and export the tiny model first (1-5 min on a busy 2-core machine).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
RAY_PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "ray.yml"
# What the ingress reports besides the experts' times: counters and a histogram it increments, a counter it only
# creates at 0 (no request is degraded here) and the two gauges, which Ray's agent drops unless sent again.
INGRESS_NAMES = (
    "requests_total",
    "route_decisions_total",
    "compute_madds_total",
    "request_duration_seconds_count",
    "degraded_requests_total",
    "inflight_requests",
    "model_info",
)
APP_ARGS = {
    "ingress": {"num_cpus": 0.5},
    # Small on purpose: several replicas of the heavy path, to see that each one reports.
    "expert_defaults": {"num_cpus": 0.25, "max_batch_size": 8},
}


@pytest.fixture(scope="module")
def cluster(tiny_store):
    """(the application's base URL, the node's Ray metrics URL)."""
    metrics_port = free_port()
    args = {**APP_ARGS, "settings": {"store": str(tiny_store)}}
    with ray_application(args, free_port(), metrics_port=metrics_port) as base:
        yield base, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def single_process(tiny_store):
    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(store=tiny_store)), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def answers(post, requests: list[dict], threads: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda body: post("/v1/classify", json=body), requests))


def essentials(body: dict) -> dict:
    return {
        "label": body["label"],
        "expert": body["route"]["expert"],
        "decided_by": body["route"]["decided_by"],
        "madds": body["compute"]["madds"],
        "madds_full": body["compute"]["madds_full"],
        "attribution_madds": body["compute"]["attribution_madds"],
        "importance_method": body["importance_method"],
    }


def assert_same(ray_body: dict, local_body: dict) -> None:
    assert essentials(ray_body) == essentials(local_body)
    for key in ("text", "image"):
        assert ray_body["importance"][key] == pytest.approx(local_body["importance"][key], abs=2e-6)
        assert ray_body["route"]["modality_weights"][key] == pytest.approx(local_body["route"]["modality_weights"][key])
    assert ("explanation" in ray_body) == ("explanation" in local_body)
    for part, values in local_body.get("explanation", {}).items():  # computed on the expert deployment
        assert ray_body["explanation"][part] == pytest.approx(values, abs=1e-5), part
    for label, p in local_body["scores"].items():
        assert ray_body["scores"][label] == pytest.approx(p, abs=1e-5), label
    for expert, s in local_body["route"]["scores"].items():
        assert ray_body["route"]["scores"][expert] == pytest.approx(s, abs=1e-5), expert


def test_64_inputs_get_the_single_process_answers(cluster, single_process, samples):
    base, _ = cluster
    requests = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:64]]
    requests[1].pop("image")  # missing modalities take their own path through the policy
    requests[2].pop("text")
    # Concurrent, so that the ingress batches requests and hands every expert sub-batches of several rows.
    with httpx.Client(base_url=base, timeout=30) as client:
        remote = answers(client.post, requests, threads=16)
    local = answers(single_process.post, requests, threads=1)
    assert [r.status_code for r in remote] == [200] * len(requests), [r.text for r in remote if r.status_code != 200]
    assert [r.status_code for r in local] == [200] * len(requests)
    for ray_answer, local_answer in zip(remote, local, strict=True):
        assert_same(ray_answer.json(), local_answer.json())
    experts = {r.json()["route"]["expert"] for r in remote}
    assert len(experts) >= 2, f"the 64 inputs took only {experts}: the test would not see the fan-out"


def test_forced_and_soft_routes_fan_out_to_the_expert_deployments(cluster, single_process, samples):
    base, _ = cluster
    experts = [e["name"] for e in single_process.get(f"/v1/models/{MODEL_NAME}").json()["experts"]]
    pair = {"image": b64(samples[5]["png"]), "text": samples[5]["text"]}
    # Explained: the exact values are computed where the expert runs, in its own deployment.
    requests = [{**pair, "route": route, "explain": True} for route in (*experts, "soft")]
    with httpx.Client(base_url=base, timeout=30) as client:
        remote = answers(client.post, requests, threads=4)
    local = answers(single_process.post, requests, threads=1)
    for request, ray_answer, local_answer in zip(requests, remote, local, strict=True):
        assert ray_answer.status_code == 200, ray_answer.text
        assert ray_answer.json()["route"]["expert"] == request["route"]
        assert_same(ray_answer.json(), local_answer.json())


@pytest.mark.parametrize(
    ("path", "request_kwargs"),
    [
        ("/v1/classify", {"json": {"text": "a red circle", "route": "no_such_expert"}}),
        ("/v1/classify", {"json": {"route": "auto"}}),
        ("/v1/classify", {"json": {"text": "x" * 5000}}),
        ("/v1/classify", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("/v1/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("/v2/models/shapes/infer", {"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32"}]}}),
    ],
)
def test_errors_are_the_single_process_errors(cluster, single_process, path, request_kwargs):
    base, _ = cluster
    remote = httpx.post(base + path, timeout=30, **request_kwargs)
    local = single_process.post(path, **request_kwargs)
    assert (remote.status_code, remote.json()) == (local.status_code, local.json())


def test_v2_health_and_models_as_the_single_process_server(cluster, single_process, samples):
    base, _ = cluster
    for path in ("/healthz", "/readyz", "/v2/health/ready", f"/v2/models/{MODEL_NAME}", f"/v1/models/{MODEL_NAME}"):
        remote = httpx.get(base + path, timeout=30)
        assert remote.status_code == 200, (path, remote.text)
        assert remote.json() == single_process.get(path).json(), path
    infer = {
        "inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [samples[0]["text"]]},
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(samples[0]["png"])]},
        ]
    }
    remote = httpx.post(f"{base}/v2/models/{MODEL_NAME}/infer", json=infer, timeout=30).json()
    local = single_process.post(f"/v2/models/{MODEL_NAME}/infer", json=infer).json()
    outputs = {o["name"]: o["data"] for o in remote["outputs"]}
    expected = {o["name"]: o["data"] for o in local["outputs"]}
    for name in ("label", "expert", "decided_by", "madds"):
        assert outputs[name] == expected[name], name


def ray_samples(url: str) -> list:
    return [s for f in text_string_to_metric_families(httpx.get(url, timeout=10).text) for s in f.samples]


def test_every_replica_reports_the_dynfuse_metrics_through_ray(cluster, samples):
    base, metrics_url = cluster
    requests = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:24]]
    with httpx.Client(base_url=base, timeout=30) as client:
        bodies = [r.json() for r in answers(client.post, requests, threads=8)]
    ran = {b["route"]["expert"] for b in bodies}
    deadline = time.monotonic() + 40  # each replica exports on its own timer, every 10 s
    while True:
        found = ray_samples(metrics_url)
        reported = {
            s.labels["expert"] for s in found if s.name == "ray_dynfuse_expert_duration_seconds_count" and s.value > 0
        }
        names = {s.name for s in found if s.name.startswith("ray_dynfuse_")}
        ingress = {f"ray_dynfuse_{name}" for name in INGRESS_NAMES}
        if (ran <= reported and ingress <= names) or time.monotonic() > deadline:
            break
        time.sleep(1)
    # Each expert's time comes from its own deployment's replica, labelled with it.
    assert ran <= reported, f"experts run {ran}, reported by Ray {reported}"
    deployments = {
        s.labels["expert"]: s.labels.get("deployment")
        for s in found
        if s.name == "ray_dynfuse_expert_duration_seconds_count" and s.value > 0
    }
    assert all(deployments[e] == f"expert_{e}" for e in ran), deployments
    assert ingress <= names, sorted(ingress - names)
    [model_info] = [s for s in found if s.name == "ray_dynfuse_model_info"]
    assert (model_info.labels["deployment"], model_info.value) == ("ingress", 1.0), model_info


@pytest.mark.e2e
def test_prometheus_reads_the_cluster_under_the_dashboards_names(cluster, samples, tmp_path):
    """docker/prometheus/ray.yml, pointed at this node: the metrics arrive as dynfuse_*, and the counters add
    up to what the responses say."""
    binary = require_tool("prometheus")
    base, metrics_url = cluster
    config = yaml.safe_load(RAY_PROMETHEUS_CONFIG.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    job["static_configs"] = [{"targets": [metrics_url.removeprefix("http://").removesuffix("/metrics")]}]
    job.pop("file_sd_configs", None)
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        requests = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[64:88]]
        with httpx.Client(base_url=base, timeout=30) as client:
            bodies = [r.json() for r in answers(client.post, requests, threads=8)]
        prom = f"http://127.0.0.1:{port}/api/v1/query"

        def scalar(promql: str) -> float | None:
            try:
                result = httpx.get(prom, params={"query": promql}, timeout=5).json()["data"]["result"]
            except (httpx.TransportError, KeyError):
                return None
            return float(result[0]["value"][1]) if result else None

        # Prometheus's dynfuse_requests_total is Ray's ray_dynfuse_requests_total, every replica's series
        # summed, once a scrape has caught up with an export that holds this test's requests.
        total = f'sum(dynfuse_requests_total{{model="{MODEL_NAME}"}})'
        deadline = time.monotonic() + 60
        while True:
            exported = sum(s.value for s in ray_samples(metrics_url) if s.name == "ray_dynfuse_requests_total")
            scraped = scalar(total)
            if (scraped == exported and exported >= len(requests)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert scraped == exported >= len(requests), (scraped, exported, len(requests))
        assert scalar("count({__name__=~'ray_dynfuse_.*'})") is None, "a ray_dynfuse_ name was not mapped back"
        # Every metric name the dashboard queries exists in Prometheus.
        missing = {
            name
            for _, expr in dq.dashboard_queries()
            for name in dq.metric_names(expr)
            if scalar(f'count({{__name__=~"{name}(_bucket|_sum|_count)?"}})') is None
        }
        # The gauges too (sent again, or the agent drops them), and the counters no request incremented yet.
        assert missing == set(), missing
        # The dashboard's groupings work on the cluster's series: by expert, summed over the replicas.
        experts_now = {
            e["metric"]["expert"]: float(e["value"][1])
            for e in httpx.get(
                prom, params={"query": "sum by (expert) (dynfuse_expert_duration_seconds_count)"}, timeout=5
            ).json()["data"]["result"]
        }
        assert {b["route"]["expert"] for b in bodies} <= set(experts_now), experts_now
    finally:
        process.terminate()
        process.wait(timeout=10)
