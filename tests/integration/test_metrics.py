"""After a known sequence of requests, the metrics equal the sums of what the responses reported."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import b64, scrape, value


def test_counters_equal_the_sums_of_the_responses(serve, samples):
    client = serve()
    responses = []
    for i, sample in enumerate(samples[:10]):
        pair = {"image": b64(sample["png"]), "text": sample["text"]}
        if i % 4 == 1:
            pair.pop("image")  # missing modality
        if i % 4 == 2:
            pair["route"] = "image"  # forced
        responses.append(client.post("/v1/classify", json=pair).json())
    batch = client.post(
        "/v1/classify/batch", json={"inputs": [{"image": b64(s["png"]), "text": s["text"]} for s in samples[10:14]]}
    ).json()["outputs"]
    responses += batch
    refused = [client.post("/v1/classify", json={"route": "auto"}), client.post("/v1/classify", json={"text": 5})]
    assert [r.status_code for r in refused] == [422, 422]

    metrics = scrape(client)
    assert value(metrics, "dynfuse_compute_madds_total", model="shapes") == sum(
        r["compute"]["madds"] for r in responses
    )
    assert value(metrics, "dynfuse_compute_full_madds_total", model="shapes") == sum(
        r["compute"]["madds_full"] for r in responses
    )
    decisions = Counter((r["route"]["expert"], r["route"]["decided_by"]) for r in responses)
    for (expert, decided_by), count in decisions.items():
        assert (
            value(metrics, "dynfuse_route_decisions_total", model="shapes", expert=expert, decided_by=decided_by)
            == count
        )
    # 10 single + 1 batch call
    labels = {"model": "shapes", "protocol": "http", "key": "anonymous"}
    assert value(metrics, "dynfuse_requests_total", status="200", **labels) == 11
    assert value(metrics, "dynfuse_requests_total", status="422", **labels) == 2
    assert value(metrics, "dynfuse_rejected_requests_total", model="shapes", reason="invalid") == 2
    for modality in ("text", "image"):
        for expert in {r["route"]["expert"] for r in responses}:  # the importance of each expert's answers
            answered = [r for r in responses if r["route"]["expert"] == expert]
            labels = {"model": "shapes", "expert": expert, "modality": modality}
            assert value(metrics, "dynfuse_modality_importance_count", **labels) == len(answered)
            assert value(metrics, "dynfuse_modality_importance_sum", **labels) == pytest.approx(
                sum(r["importance"][modality] for r in answered), abs=1e-3
            )
        assert value(metrics, "dynfuse_modality_weight_count", model="shapes", modality=modality) == len(responses)
        assert value(metrics, "dynfuse_modality_weight_sum", model="shapes", modality=modality) == pytest.approx(
            sum(r["route"]["modality_weights"][modality] for r in responses), abs=1e-3
        )
    assert value(metrics, "dynfuse_request_duration_seconds_count", model="shapes", protocol="http") == 13
    assert value(metrics, "dynfuse_queue_duration_seconds_count", model="shapes") == len(responses)
    assert value(metrics, "dynfuse_batch_size_sum", model="shapes") == len(responses)
    assert value(metrics, "dynfuse_inflight_requests", model="shapes") == 0
    assert value(metrics, "dynfuse_model_info", model="shapes", version="1", backend="onnx", device="cpu") == 1
    experts_run = {r["route"]["expert"] for r in responses}
    for expert in experts_run:
        assert value(metrics, "dynfuse_expert_duration_seconds_count", model="shapes", expert=expert) >= 1


def test_the_compute_saved_ratio_of_the_counters_matches_the_responses(serve, samples):
    client = serve()
    responses = [
        client.post("/v1/classify", json={"image": b64(s["png"]), "text": s["text"]}).json() for s in samples[:8]
    ]
    metrics = scrape(client)
    saved = 1 - value(metrics, "dynfuse_compute_madds_total", model="shapes") / value(
        metrics, "dynfuse_compute_full_madds_total", model="shapes"
    )
    mean_of_responses = sum(r["compute"]["saved_ratio"] for r in responses) / len(responses)
    assert saved == pytest.approx(mean_of_responses, abs=1e-5)  # every request has the same madds_full
