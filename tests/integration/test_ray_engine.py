"""The Ray Serve engine on a local cluster, as a user gets it (this machine's CPUs, the application's defaults
sized to them): an ingress and one deployment per expert answer exactly what the single-process server answers,
with the same error bodies; every replica reports the dynfuse metrics through Ray's agent, which a real Prometheus
with docker/prometheus/ray.yml reads under the dashboard's names; a killed expert replica fails only its own
requests (the other experts' requests of its batches are answered meanwhile), and comes back; a model swap
deploys the new version's experts beside the old ones and never mixes versions in an answer.

One cluster for the module (it takes 50-90 s to start on a busy 2-core machine), torn down at the end. The CLI
that starts one (``dynfuse serve --engine ray``) has its own test: tests/e2e/test_ray_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dashboard_queries as dq
import httpx
import pytest
import yaml
from conftest import MODEL_NAME, b64, free_port, require_tool, wait_ready, with_guard_floor
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from ray_cluster import publish_biased_version, ray_application, replica_pids

from service.ray.app import APP_NAME
from service.ray.versions import version_app_name

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
# Version 2 of the module's store answers this label whenever its text expert runs (tests/ray_cluster.py).
V2_TEXT_LABEL = "green_cross"
REQUEST_TIMEOUT_S = 10.0  # the default DYNFUSE_REQUEST_TIMEOUT_S: no request may take much longer


@pytest.fixture(scope="module")
def ray_store(tiny_store, tmp_path_factory) -> Path:
    """The tiny model's version 1, with a safer policy for its guard (the shipped model has none: its guard stays
    off, on either engine), and a version 2 whose text expert always answers V2_TEXT_LABEL."""
    store = tmp_path_factory.mktemp("ray-store") / "store"
    shutil.copytree(tiny_store, store)
    model_json = store / MODEL_NAME / "1" / "model.json"
    model_json.write_text(json.dumps(with_guard_floor(json.loads(model_json.read_text()))))
    publish_biased_version(store, "2", expert="text", label=V2_TEXT_LABEL)
    return store


@pytest.fixture(scope="module")
def cluster(ray_store):
    """(the application's base URL, the node's Ray metrics URL). No deployment option is given: every one is
    sized to the cluster (Ray counts this machine's CPUs), as for a user. Where this differs from the defaults,
    for the swap test: version 1 is pinned (the store's highest is 2, which the swap test loads), and model
    control is on (explicit, on loopback, so no admin key), which also sizes the experts with room for a second
    version's. Every answer a cheaper expert gave is audited, and the route mix's drift is published from 10 picks
    on (as tests/e2e/test_prometheus.py runs the single process: the defaults leave this module's few hundred
    requests with no audit and no drift); the guard watches, but its false-alarm rate is set so rare (one per 10^9
    audits, the inputs not used) that it engages on no traffic this module sends, so that the answers stay comparable
    with the single process's. tests/e2e/test_ray_cli.py runs the
    defaults as they are."""
    metrics_port = free_port()
    safety = {
        "audit_rate": 1.0,
        "drift_window": 10,
        "guard_false_alarm_audits": 1e9,
        "guard_shifted_false_alarm_audits": 1e9,
        "guard_input_shift_share": 0.0,
    }
    args = {"settings": {"store": str(ray_store), "model_version": "1", "host": "127.0.0.1", **safety}}
    env = {"DYNFUSE_MODEL_CONTROL": "explicit"}
    with ray_application(args, free_port(), metrics_port=metrics_port, env=env) as base:
        yield base, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def single_process(ray_store):
    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(store=ray_store, model_version="1")), raise_server_exceptions=False) as client:
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
        "uncertain": body["uncertain"],
        "uncertain_reason": body.get("uncertain_reason"),
        "guarded": body["route"]["guarded"],
    }


def assert_same(ray_body: dict, local_body: dict) -> None:
    assert essentials(ray_body) == essentials(local_body)
    # Both are rounded to 6 decimals: another batch's float32 rounding noise can move the last digit by one.
    for key in ("text", "image"):
        assert ray_body["importance"][key] == pytest.approx(local_body["importance"][key], abs=2e-6)
        weights = ray_body["route"]["modality_weights"][key], local_body["route"]["modality_weights"][key]
        assert weights[0] == pytest.approx(weights[1], abs=2e-6)
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


def same_policies(safety: dict) -> dict:
    """What of GET /v1/models/{name}'s ``safety`` comes from the model, not from the traffic or the settings."""
    guard = safety["guard"]
    keys = ("enabled", "operating_point", "served_policy", "safer_policy", "safer_min_confidence")
    keys += ("validated_agreement",)
    # Not ``drift``: a point has a figure there only once its window saw enough picks, which depends on the
    # traffic each server had before (the cluster publishes from 10 picks on; random order decides what ran first).
    return {"guard": {k: guard[k] for k in keys}, "uncertain": safety["uncertain"]}


def test_v2_health_and_models_as_the_single_process_server(cluster, single_process, samples):
    base, _ = cluster
    for path in ("/healthz", "/readyz", "/v2/health/ready", f"/v2/models/{MODEL_NAME}", f"/v1/models/{MODEL_NAME}"):
        remote = httpx.get(base + path, timeout=30)
        assert remote.status_code == 200, (path, remote.text)
        mine, theirs = remote.json(), single_process.get(path).json()
        if "safety" in theirs:  # the live state of each server's own traffic and settings (the cluster's audit all)
            assert same_policies(mine.pop("safety")) == same_policies(theirs.pop("safety")), path
        assert mine == theirs, path
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


def served_versions(model_info: list) -> list[str]:
    return sorted(s.labels["version"] for s in model_info)


def test_every_replica_reports_the_dynfuse_metrics_through_ray(cluster, samples):
    base, metrics_url = cluster
    requests = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:24]]
    with httpx.Client(base_url=base, timeout=30) as client:
        bodies = [r.json() for r in answers(client.post, requests, threads=8)]
    ran = {b["route"]["expert"] for b in bodies}
    answered = sorted({b["model_version"] for b in bodies})
    deadline = time.monotonic() + 40  # each replica exports on its own timer, every 10 s
    while True:
        found = ray_samples(metrics_url)
        reported = {
            s.labels["expert"] for s in found if s.name == "ray_dynfuse_expert_duration_seconds_count" and s.value > 0
        }
        names = {s.name for s in found if s.name.startswith("ray_dynfuse_")}
        ingress = {f"ray_dynfuse_{name}" for name in INGRESS_NAMES}
        # Ray's export lags the replica by up to an export interval: after a swap (the swap test may have just
        # run) the agent still shows the old version at 1 for a while. The served series is the answers' version.
        served = [s for s in found if s.name == "ray_dynfuse_model_info" and s.value == 1]
        if (
            ran <= reported and ingress <= names and served_versions(served) == answered
        ) or time.monotonic() > deadline:
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
    assert answered == ["1"]
    assert served_versions(served) == answered, [
        (s.labels, s.value) for s in found if s.name == "ray_dynfuse_model_info"
    ]
    assert served[0].labels["deployment"] == "ingress", served[0].labels


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
        # The dashboard's groupings work on the cluster's series: by expert, summed over the replicas. Each expert's
        # deployment exports its own series, on its own schedule: wait until every expert that answered has one.
        answered = {b["route"]["expert"] for b in bodies}
        deadline = time.monotonic() + 60
        while True:
            experts_now = {
                e["metric"]["expert"]: float(e["value"][1])
                for e in httpx.get(
                    prom, params={"query": "sum by (expert) (dynfuse_expert_duration_seconds_count)"}, timeout=5
                ).json()["data"]["result"]
            }
            if answered <= set(experts_now) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answered <= set(experts_now), (answered - set(experts_now), experts_now)

        # Is routing still safe? on the cluster: the ingress audits the answers of cheaper experts on the full
        # path's deployment, publishes the drift of its route mix and its guard's state (watching: off, 0).
        def eventually(promql: str, holds, what: str) -> float | None:
            deadline = time.monotonic() + 60
            while not holds(value := scalar(promql)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert holds(value), (what, promql, value)
            return value

        model = f'model="{MODEL_NAME}"'
        audited = f'sum(dynfuse_audits_total{{{model}, outcome=~"agreed|disagreed"}})'
        eventually(audited, lambda v: v and v > 0, "audits")
        eventually(f"sum(dynfuse_audit_madds_total{{{model}}})", lambda v: v and v > 0, "audit compute")
        eventually(f"max(dynfuse_route_mix_drift{{{model}}})", lambda v: v is not None and 0 <= v <= 1, "drift")
        eventually(f"max(dynfuse_guard_active{{{model}}})", lambda v: v == 0, "guard off")
        eventually(f"sum(dynfuse_guard_changes_total{{{model}}})", lambda v: v == 0, "no guard change")
        answered = len(bodies)
        eventually(f"sum(dynfuse_top_probability_count{{{model}}})", lambda v: v and v >= answered, "top probability")
        # GET /v1/models/{name}: the state of the ingress replica that answers it (each guards its own traffic).
        guard = httpx.get(f"{base}/v1/models/{MODEL_NAME}", timeout=10).json()["safety"]["guard"]
        assert (guard["state"], guard["active"], guard["changes"]) == ("watching", False, 0), guard
        assert guard["recent_audits"] > 0, guard
    finally:
        process.terminate()
        process.wait(timeout=10)


class Traffic:
    """Clients sending one request body in a loop until stopped; each answer as (sent at, status, seconds, body)."""

    def __init__(self, base: str, body: dict, clients: int):
        self.answers: list[tuple[float, int | str, float, dict]] = []
        self.sent: list[float] = []  # when each request went out (answered or not yet)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(base, body)) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, base: str, body: dict) -> None:
        # A request the server has not answered well past its own deadline counts as hung.
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S + 20) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                self.sent.append(sent)
                try:
                    response = client.post("/v1/classify", json=body)
                    status, payload = response.status_code, response.json()
                except httpx.TimeoutException:
                    status, payload = "hung", {}
                self.answers.append((sent, status, time.monotonic() - sent, payload))

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition(list(self.answers)):
            assert time.monotonic() < deadline, f"{what} not seen within {timeout} s: {self.summary()}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 30)

    def summary(self) -> dict:
        counts: dict = {}
        for _, status, _, _ in self.answers:
            counts[status] = counts.get(status, 0) + 1
        return counts


def test_a_killed_expert_replica_fails_only_its_own_requests_and_comes_back(cluster, single_process, samples):
    """SIGKILL the one replica of the image expert under load, with requests forced to the text expert batched
    beside its requests. Serve replaces it, and its router holds the calls meant for it until the replacement
    runs. Each expert's rows complete on their own (service/ray/experts.py): the text requests are all answered
    200 with the single process's answer; the image requests are answered 200 once the replacement runs, or get
    503/504 with an error that names the image expert (never a 500, never a hang). bench/ray_engine.py measures
    the same on the default model."""
    base, _ = cluster
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}
    text_body, image_body = {**pair, "route": "text"}, {**pair, "route": "image"}
    expected = single_process.post("/v1/classify", json=text_body).json()  # the text expert's answer, one process
    victim_app = version_app_name(APP_NAME, MODEL_NAME, "1", "image")
    [victim_pid] = replica_pids(victim_app)
    bystanders = Traffic(base, text_body, clients=2)
    victims = Traffic(base, image_body, clients=2)
    try:
        for traffic in (bystanders, victims):
            traffic.wait_for(lambda a: sum(s == 200 for _, s, _, _ in a) >= 5, 60, "five answers before the kill")
        killed_at = time.monotonic()
        subprocess.run(["kill", "-9", str(victim_pid)], check=True)
        # Answered after the kill, and sent after it too: the expert's deployment serves again.
        victims.wait_for(
            lambda a: any(sent > killed_at and status == 200 for sent, status, _, _ in a), 120, "an answer after"
        )
        bystanders.wait_for(lambda a: sum(sent > killed_at for sent, *_ in a) >= 5, 60, "text answers after")
    finally:
        bystanders.stop()
        victims.stop()
    in_flight = [a for a in victims.answers if a[0] < killed_at < a[0] + a[2]]
    assert in_flight, "no request to the image expert was in flight at the kill"
    assert {status for _, status, _, _ in bystanders.answers} == {200}, bystanders.summary()
    for _, _, _, body in bystanders.answers:  # the values, not only the status
        assert (body["label"], body["route"]["expert"]) == (expected["label"], "text")
        for label, p in expected["scores"].items():
            assert body["scores"][label] == pytest.approx(p, abs=1e-5), label
    assert {status for _, status, _, _ in victims.answers} <= {200, 503, 504}, victims.summary()
    failed = [body for _, status, _, body in victims.answers if status != 200]
    assert all(body["error"]["code"] in ("not_ready", "deadline_exceeded") for body in failed), failed[:3]
    assert all("'image'" in body["error"]["message"] for body in failed), failed[:3]  # what it waited for
    slowest = max(seconds for _, _, seconds, _ in victims.answers + bystanders.answers)
    assert slowest < REQUEST_TIMEOUT_S + 5, f"a request took {slowest:.1f} s: past its deadline"
    [replacement] = replica_pids(victim_app)
    assert replacement != victim_pid


def test_a_frozen_expert_replica_holds_only_its_own_requests(cluster, single_process, samples):
    """SIGSTOP the image expert's replica (a replica starved of CPU, or being replaced: its calls wait) under
    traffic to the text and image experts, which the ingress batches together. An image request sent while it is
    frozen waits for it; text requests sent after that one are answered before it, 200 with the single process's
    answers, batch after batch. After SIGCONT the image requests are answered with the single process's answers;
    those whose deadline came first get a 504 that names the image expert. Before each expert's rows completed
    on their own, every batch holding an image request waited for it, and the text requests got 504."""
    base, _ = cluster
    pair = {"image": b64(samples[7]["png"]), "text": samples[7]["text"]}
    text_body, image_body = {**pair, "route": "text"}, {**pair, "route": "image"}
    expected = {
        "text": single_process.post("/v1/classify", json=text_body).json(),
        "image": single_process.post("/v1/classify", json=image_body).json(),
    }
    [frozen_pid] = replica_pids(version_app_name(APP_NAME, MODEL_NAME, "1", "image"))
    bystanders = Traffic(base, text_body, clients=2)
    victims = Traffic(base, image_body, clients=2)
    try:
        for traffic in (bystanders, victims):
            traffic.wait_for(lambda a: sum(s == 200 for _, s, _, _ in a) >= 3, 60, "three answers before the freeze")
        os.kill(frozen_pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # The image requests in flight at the freeze end at their deadline; one sent after it is then held.
            deadline = time.monotonic() + 90
            while not (held_sent := [t for t in list(victims.sent) if t > frozen_at]):
                assert time.monotonic() < deadline, f"no image request sent while frozen: {victims.summary()}"
                time.sleep(0.1)
            held_at = held_sent[0]
            bystanders.wait_for(lambda a: sum(t > held_at for t, *_ in a) >= 3, 60, "text answers while it waits")
        finally:
            os.kill(frozen_pid, signal.SIGCONT)
            resumed_at = time.monotonic()
        victims.wait_for(lambda a: any(t == held_at for t, *_ in a), 60, "the held image request answered")
        victims.wait_for(lambda a: any(t > resumed_at and s == 200 for t, s, _, _ in a), 60, "image answers again")
    finally:
        bystanders.stop()
        victims.stop()
    [(_, held_status, held_seconds, _)] = [a for a in victims.answers if a[0] == held_at]
    # Answered once the replica ran again (200), or at its deadline (504); never while it was frozen.
    assert held_at + held_seconds > resumed_at - 0.5 or held_status == 504, (held_at, held_seconds, resumed_at)
    meanwhile = [
        a for a in bystanders.answers if held_at < a[0] and a[0] + a[2] < min(resumed_at, held_at + held_seconds)
    ]
    assert len(meanwhile) >= 3, bystanders.summary()
    for kind, traffic in (("text", bystanders), ("image", victims)):
        for _, status, _, body in traffic.answers:
            if status != 200:
                continue
            assert (body["label"], body["route"]["expert"]) == (expected[kind]["label"], kind)
            for label, p in expected[kind]["scores"].items():
                assert body["scores"][label] == pytest.approx(p, abs=1e-5), (kind, label)
    assert {status for _, status, _, _ in bystanders.answers} == {200}, bystanders.summary()
    assert {status for _, status, _, _ in victims.answers} <= {200, 504}, victims.summary()
    late = [body for _, status, _, body in victims.answers if status == 504]
    assert all("'image'" in body["error"]["message"] for body in late), late[:3]


def test_a_swap_deploys_the_new_experts_beside_the_old_and_never_mixes_versions(cluster, samples):
    """Version 2's text expert answers V2_TEXT_LABEL for everything. Under traffic forced to the text expert, a
    load of version 2 answers 200 only once v2's experts run beside v1's; every answer says the version whose
    expert computed it (v1's labels on v1, V2_TEXT_LABEL on v2), v1's expert applications are deleted after,
    and a swap back to v1 works the same way (the test leaves the cluster as it found it)."""
    base, _ = cluster
    pair = {"text": samples[3]["text"], "route": "text"}
    v1_label = httpx.post(f"{base}/v1/classify", json=pair, timeout=30).json()["label"]
    assert v1_label != V2_TEXT_LABEL, "pick a sample version 1 does not already answer with the label"
    traffic = Traffic(base, pair, clients=2)
    try:
        for version, expected in (("2", V2_TEXT_LABEL), ("1", v1_label)):
            other = "1" if version == "2" else "2"
            load = httpx.post(
                f"{base}/v2/repository/models/{MODEL_NAME}/load",
                json={"parameters": {"version": version}},
                timeout=400,
            )
            assert load.status_code == 200, load.text
            swapped_at = time.monotonic()
            traffic.wait_for(lambda a, s=swapped_at: sum(t > s for t, *_ in a) >= 5, 60, f"answers on v{version}")
            after = {
                (body["model_version"], body["label"]) for sent, _, _, body in traffic.answers if sent > swapped_at
            }
            assert after == {(version, expected)}, after
            old = [version_app_name(APP_NAME, MODEL_NAME, other, e) for e in ("text", "image", "mi2p")]
            deadline = time.monotonic() + 60
            while any(name in serve_applications() for name in old) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not any(name in serve_applications() for name in old), serve_applications()
            assert version_app_name(APP_NAME, MODEL_NAME, version, "text") in serve_applications()
    finally:
        traffic.stop()
    assert {status for _, status, _, _ in traffic.answers} == {200}, traffic.summary()
    labels = {(body["model_version"], body["label"]) for _, _, _, body in traffic.answers}
    assert labels == {("1", v1_label), ("2", V2_TEXT_LABEL)}, labels


def serve_applications() -> set[str]:
    from ray import serve

    return set(serve.status().applications)
