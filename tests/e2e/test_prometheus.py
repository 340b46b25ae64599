"""A real Prometheus scraping a real ``dynfuse serve``: after a known burst of requests, every panel
query of the Grafana dashboard returns data through Prometheus's HTTP API, and the compute-saved
panel agrees with what the responses reported.

Prometheus is Debian's ``prometheus`` package (.ci/run installs it), started here on a free loopback
port with a generated config that scrapes the service every second.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import dashboard_queries as dq
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from conftest import MODEL_NAME, b64, free_port, require_tool, with_guard_floor
from prometheus_process import Prometheus, start_prometheus, stop
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL_S = 1
MAX_BODY_BYTES = 256 * 1024  # the service's limit here: one request goes over it

EXPERTS = ("text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse")


# --- Prometheus ---------------------------------------------------------------------------------


@pytest.fixture
def prometheus(tmp_path):
    """``start(target)`` -> a ready Prometheus scraping ``target`` (host:port) every second;
    terminated at teardown."""
    binary = require_tool("prometheus")
    started: list[subprocess.Popen] = []

    def start(target: str) -> Prometheus:
        interval = f"{SCRAPE_INTERVAL_S}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": "dynfuse",
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        return start_prometheus(binary, tmp_path, config, started)

    yield start
    stop(started)


# --- the burst ----------------------------------------------------------------------------------


def burst(samples: list[dict]) -> list[dict]:
    """POST /v1/classify as [{"kwargs": for httpx.post, "reason": the rejection expected, or None}]: 15 pairs
    routed by the router, 9 with one modality missing, each expert forced once, 6 with a confidence floor of 1,
    7 refused."""
    requests = []
    for i, sample in enumerate(samples[:30]):
        pair = {"image": b64(sample["png"]), "text": sample["text"]}
        if i % 5 == 1:
            pair.pop("image")  # missing modality: text only
        elif i % 10 == 3:
            pair.pop("text")  # missing modality: image only
        elif i % 5 == 2:
            pair["route"] = EXPERTS[i // 5 % len(EXPERTS)]  # forced
        requests.append(({"json": pair}, None))
    for expert in EXPERTS[len(samples[:30]) // 5 :]:  # ... each expert once
        requests.append(
            ({"json": {"image": b64(samples[0]["png"]), "text": samples[0]["text"], "route": expert}}, None)
        )
    # The cheaper router with the router alone deciding, and a confidence floor no cheaper expert reaches:
    # whatever goes to a cheaper expert falls back to the full path (decided_by "confidence"). The tiny
    # model sends most cross-modal pairs to a cheaper expert.
    for sample in [s for s in samples if s["kind"] == "cross_modal"][:6]:
        pair = {"image": b64(sample["png"]), "text": sample["text"], "operating_point": "lambda_0.3"}
        requests.append(({"json": pair | {"threshold": 0.0, "min_confidence": 1.0}}, None))
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}
    requests += [
        ({"json": {"route": "auto"}}, "invalid"),  # 422: neither modality
        ({"json": {"text": 5}}, "invalid"),  # 422: wrong type
        ({"json": {**pair, "route": "no_such_expert"}}, "invalid"),  # 422: unknown route
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "invalid"),  # 400
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, "invalid"),  # 415
        ({"json": {"text": "x" * 5000}}, "too_large"),  # 413: over max_text_chars
        ({"content": b"x" * (MAX_BODY_BYTES + 1), "headers": {"content-type": "application/json"}}, "too_large"),
    ]
    return [{"kwargs": kwargs, "reason": reason} for kwargs, reason in requests]


def send(base: str, requests: list[dict]) -> list[httpx.Response]:
    with httpx.Client(base_url=base, timeout=10) as client, ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda r: client.post("/v1/classify", **r["kwargs"]), requests))


def send_grpc(url: str, samples: list[dict], full: str) -> tuple[list[int], set[str], int, list[dict]]:
    """A few calls of the Open Inference Protocol over gRPC (tritonclient.grpc): (MAdds of each answered row,
    the HTTP statuses the metrics count them under, how many answers are audited: those of a cheaper expert the
    router picked, or that a confidence fallback replaced; each row's expert, importance and modality weights as
    /v1 names them)."""
    client = triton_grpc.InferenceServerClient(url)
    madds, statuses, audited, answers = [], set(), 0, []
    for rows in (samples[:3], samples[3:4]):
        inputs = []
        for name, elements in (("image", [s["png"] for s in rows]), ("text", [s["text"].encode() for s in rows])):
            tensor = triton_grpc.InferInput(name, [len(rows)], "BYTES")
            tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
            inputs.append(tensor)
        result = client.infer(MODEL_NAME, inputs)
        madds += result.as_numpy("madds").tolist()
        for expert, importance, weights in zip(
            result.as_numpy("expert"), result.as_numpy("importance"), result.as_numpy("modality_weights"), strict=True
        ):
            text, image = importance.tolist()
            text_weight, image_weight = weights.tolist()
            route = {"expert": expert.decode(), "modality_weights": {"text": text_weight, "image": image_weight}}
            answers.append({"route": route, "importance": {"text": text, "image": image}})
        for expert, decided_by in zip(result.as_numpy("expert"), result.as_numpy("decided_by"), strict=True):
            audited += decided_by == b"confidence" or (decided_by == b"router" and expert.decode() != full)
        statuses.add("200")
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL_NAME, inputs, parameters={"route": "no_such_expert"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    statuses.add("400")
    client.close()
    return madds, statuses, audited, answers


# --- the test -----------------------------------------------------------------------------------


def test_every_dashboard_query_returns_data_and_compute_saved_matches_the_responses(
    server_process, prometheus, samples, store_copy
):
    started = time.monotonic()
    # The served store, with a floor for its guard when validation chose none (the guard's panel shows its
    # changes: a guard with no safer policy has none), degrading to its cheapest other operating point.
    [model_json] = list(store_copy.glob(f"{MODEL_NAME}/*/model.json"))
    manifest = with_guard_floor(json.loads(model_json.read_text()))
    model_json.write_text(json.dumps(manifest))
    served = manifest["router"]["operating_point"]
    cheaper = max((r["lambda"], r["name"]) for r in manifest["routers"] if r["name"] != served)[1]
    # Degrading from one waiting request on, with batches that wait 100 ms to fill: the burst's concurrent
    # requests find one waiting, so some are served degraded.
    grpc_port = free_port()
    # Every answer of a cheaper expert audited, and the route mix's drift published from 10 picks on: the
    # defaults (2% of those answers, a window of 500 picks) leave a burst of 44 requests with no audit and no
    # drift, and the "Is routing still safe?" panels with nothing to show. tests/e2e/test_alerts.py runs them
    # on a longer replay.
    _, base = server_process(
        store_copy,
        grpc_port=grpc_port,
        max_body_bytes=MAX_BODY_BYTES,
        degrade_to=cheaper,
        degrade_high_water=1,
        degrade_low_water=0,
        max_batch_delay_ms=100,
        audit_rate=1.0,
        drift_window=10,
    )
    prom = prometheus(base.removeprefix("http://"))
    job = '{job="dynfuse"}'

    # At least one scrape before the burst: every counter the service creates at startup has a 0 sample.
    prom.wait_for(f"up{job}", lambda v: v == 1, "first scrape of dynfuse")
    prom.wait_for(
        f'sum(dynfuse_compute_full_madds_total{{model="{MODEL_NAME}"}})', lambda v: v == 0, "zero before the burst"
    )

    requests = burst(samples)
    responses = send(base, requests)
    full = httpx.get(f"{base}/v1/models/{MODEL_NAME}").json()["full_expert"]
    grpc_madds, grpc_statuses, grpc_audited, grpc_answers = send_grpc(f"127.0.0.1:{grpc_port}", samples, full)
    grpc_calls = 3  # two answered, one refused

    for request, response in zip(requests, responses, strict=True):
        if request["reason"] is None:
            assert response.status_code == 200, response.text
        else:
            assert 400 <= response.status_code < 500, response.text
    statuses = {str(r.status_code) for r in responses}
    ok = [r.json() for r in responses if r.status_code == 200]
    experts_run = {r["route"]["expert"] for r in ok}
    deciders = {r["route"]["decided_by"] for r in ok}
    assert {"missing_modality", "request", "confidence"} <= deciders, deciders
    assert any(r["route"]["degraded"] for r in ok), "no request was served degraded"
    assert experts_run == set(EXPERTS), experts_run

    # The audits run after the answers were sent, in spare capacity: every answer a cheaper expert gave to a
    # request the router decided (a confidence fallback keeps the cheaper answer: its audit is free), over
    # either transport.
    audited = [
        r
        for q, r in zip(requests, [x.json() if x.status_code == 200 else None for x in responses], strict=True)
        if r is not None
        and set(q["kwargs"]["json"]) >= {"image", "text"}
        and q["kwargs"]["json"].get("route", "auto") == "auto"
        and r["route"]["decided_by"] in ("router", "confidence")
        and (r["route"].get("fallback_from") or r["route"]["expert"]) != full
    ]
    assert audited, "the burst has answers of cheaper experts"

    # Until Prometheus has a sample with the whole burst and its audits, then one scrape more, so that even a
    # series first scraped in that sample has two samples in the window (rate() needs two).
    everything = len(requests) + grpc_calls
    prom.wait_for(f'sum(dynfuse_requests_total{{model="{MODEL_NAME}"}})', lambda v: v == everything, "burst scraped")
    prom.wait_for(
        f'sum(dynfuse_audits_total{{model="{MODEL_NAME}", outcome=~"agreed|disagreed"}})',
        lambda v: v == len(audited) + grpc_audited,
        "audits scraped",
    )
    scrapes = prom.scalar(f"count_over_time(up{job}[1m])")
    prom.wait_for(f"count_over_time(up{job}[1m])", lambda v: v > scrapes, "one scrape after the burst")
    assert time.monotonic() - started < 45, "the [1m] windows must cover the run from the first scrape"

    # Compute saved: rate() is (last - first) times an extrapolation factor that depends only on the
    # sample times in the window and, for a counter, on first / (last - first) (it does not
    # extrapolate below zero). Both counters are scraped at the same instants and are 0 at the
    # window's first sample (scraped before the burst), so the factor is the same for both and
    # cancels in the ratio: what is left is float rounding.
    madds_full_per_row = httpx.get(f"{base}/v1/models/{MODEL_NAME}", timeout=10).json()["madds_full"]
    madds = sum(r["compute"]["madds"] for r in ok) + sum(grpc_madds)
    madds_full = sum(r["compute"]["madds_full"] for r in ok) + madds_full_per_row * len(grpc_madds)
    expected = 1 - madds / madds_full
    saved_queries = [
        expr
        for _, expr in dq.dashboard_queries()
        if "dynfuse_compute_madds_total" in expr and "dynfuse_compute_full_madds_total" in expr
    ]
    assert saved_queries, "no compute-saved query in the dashboard"
    for expr in saved_queries:
        for model in (MODEL_NAME, ".*"):
            [entry] = prom.query(dq.render_expr(expr, model=model))
            assert entry["metric"] == {"model": MODEL_NAME}
            assert float(entry["value"][1]) == pytest.approx(expected, rel=1e-9), expr

    # Every panel query, as Grafana sends it for the served model and for "All". The burst ran every
    # expert, both modalities, several statuses and rejection reasons, so every group of every query
    # has observations in the window: a NaN (a quantile or mean over zero observations) or a rate
    # that is zero everywhere means that Prometheus did not see the burst's increments, as happens
    # to a series born at its first increment (rate() has no earlier sample to start from).
    problems = []
    for title, expr in dq.dashboard_queries():
        for model in (MODEL_NAME, ".*"):
            promql = dq.render_expr(expr, model=model)
            result = prom.query(promql)
            values = [float(entry["value"][1]) for entry in result]
            if not result:
                problems.append(f"{title!r}: no series for {promql}")
            elif not all(math.isfinite(v) for v in values):
                problems.append(f"{title!r}: not finite {result} for {promql}")
            elif "rate(" in promql and not any(v > 0 for v in values):
                problems.append(f"{title!r}: zero everywhere after the burst {result} for {promql}")
    assert not problems, "\n".join(problems)

    # The grouped rate panels show every label value the burst produced, and only those.
    def positive(title: str, label: str) -> set[str]:
        [expr] = [expr for t, expr in dq.dashboard_queries() if t == title]
        result = prom.query(dq.render_expr(expr, model=MODEL_NAME))
        return {entry["metric"].get(label, "") for entry in result if float(entry["value"][1]) > 0}

    assert positive("Route mix by expert", "expert") == experts_run
    assert positive("Route decisions by decided_by", "decided_by") == deciders
    assert positive("Rejections / s by reason", "reason") == {r["reason"] for r in requests if r["reason"]}
    assert positive("Requests / s by protocol and status", "status") == statuses | grpc_statuses
    assert positive("Requests / s by protocol and status", "protocol") == {"http", "grpc"}
    assert positive("Requests / s by operating point", "operating_point") == {r["route"]["operating_point"] for r in ok}

    # What decided the answers, per expert, and what decided the paths: the means the responses reported (sum and
    # count of a histogram are scraped together, so rate()'s extrapolation cancels in their ratio).
    def shown(title: str, label: str) -> dict[str, float]:
        exprs = [expr for t, expr in dq.dashboard_queries() if t == title]
        result = prom.query(dq.render_expr(exprs[0], model=MODEL_NAME))
        return {entry["metric"][label]: float(entry["value"][1]) for entry in result}

    answered = ok + grpc_answers  # both transports' answers are observed
    image_share = {
        expert: sum(r["importance"]["image"] for r in answered if r["route"]["expert"] == expert)
        / sum(r["route"]["expert"] == expert for r in answered)
        for expert in experts_run | {r["route"]["expert"] for r in grpc_answers}
    }
    assert shown("Modality importance by expert: image share", "expert") == pytest.approx(image_share, abs=1e-6)
    weights = {m: sum(r["route"]["modality_weights"][m] for r in answered) / len(answered) for m in ("text", "image")}
    assert shown("Modality weights (router): mean and quantiles", "modality") == pytest.approx(weights, abs=1e-6)
