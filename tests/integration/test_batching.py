"""Micro-batching through the ASGI transport: concurrent requests share batches, answers do not change,
and a burst larger than the queue gets 200s and 503s, nothing lost and nothing hanging."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from conftest import b64

from service.config import Settings
from service.main import create_app


@contextlib.asynccontextmanager
async def running_app(store, **settings):
    app = create_app(Settings(store=store, **settings))
    async with app.router.lifespan_context(app):
        for _ in range(600):
            if app.state.service is not None:
                break
            await asyncio.sleep(0.05)
        assert app.state.service is not None, app.state.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dynfuse") as client:
            yield app, client


def pairs(samples, n):
    out = []
    for i, s in enumerate(samples[:n]):
        pair = {"image": b64(s["png"]), "text": s["text"]}
        if i % 5 == 3:
            pair.pop("image")  # mixed modalities inside one batch
        if i % 5 == 4:
            pair["route"] = "image"
        out.append(pair)
    return out


def test_an_answer_is_the_same_alone_and_inside_a_concurrent_batch(tiny_store, samples):
    async def scenario():
        async with running_app(tiny_store, max_batch_size=16, max_batch_delay_ms=50) as (app, client):
            requests = pairs(samples, 24)
            alone = [(await client.post("/v1/classify", json=p)).json() for p in requests]
            together = await asyncio.gather(*(client.post("/v1/classify", json=p) for p in requests))
            batches = app.state.metrics.registry.get_sample_value("dynfuse_batch_size_count", {"model": "shapes"})
            return alone, [r.json() for r in together], batches

    alone, together, batches = asyncio.run(scenario())
    for one, other in zip(alone, together, strict=True):
        assert one["label"] == other["label"]
        assert one["route"]["expert"] == other["route"]["expert"]
        for label, p in one["scores"].items():
            assert other["scores"][label] == pytest.approx(p, abs=1e-5)
    # 24 sequential requests made 24 batches of one; the burst must have shared batches.
    assert batches < 24 + 24, f"{batches} batches for 48 requests: the burst was not batched"


def test_a_burst_larger_than_the_capacity_gets_200_or_503_and_none_is_lost(tiny_store, samples):
    async def scenario():
        async with running_app(tiny_store, max_batch_size=2, max_queue=4, max_batch_delay_ms=20) as (app, client):
            requests = pairs(samples, 10) * 6
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.post("/v1/classify", json=p) for p in requests)), timeout=60
            )
            after = await client.post("/v1/classify", json=requests[0])
            return responses, after, app.state.metrics

    responses, after, metrics = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert len(statuses) == 60
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0, "the burst never overflowed a capacity of 2"
    assert statuses.count(200) >= 2
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["label"]
    rejected = sum(
        metrics.registry.get_sample_value("dynfuse_rejected_requests_total", {"model": "shapes", "reason": reason})
        for reason in ("over_capacity", "queue_full")
    )
    assert rejected == statuses.count(503)
    assert after.status_code == 200


def test_requests_before_the_model_is_loaded_get_503_not_ready(tiny_store, samples, held_model_load):

    async def scenario():
        app = create_app(Settings(store=tiny_store))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dynfuse") as client:
                early = await client.post("/v1/classify", json={"text": "a red circle"})
                ready_early = await client.get("/readyz")
                alive_early = await client.get("/healthz")
                held_model_load.set()
                for _ in range(600):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                late = await client.post("/v1/classify", json={"text": "a red circle"})
                return early, ready_early, alive_early, late

    early, ready_early, alive_early, late = asyncio.run(scenario())
    assert early.status_code == 503
    assert early.json()["error"]["code"] == "not_ready"
    assert ready_early.status_code == 503
    assert ready_early.json()["status"] == "loading"
    assert alive_early.status_code == 200
    assert late.status_code == 200


def test_a_store_that_fails_to_load_reports_why_on_readyz(store_copy):
    from fastapi.testclient import TestClient

    onnx_file = next(store_copy.glob("shapes/1/text_encoder.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"tampered")
    with TestClient(create_app(Settings(store=store_copy))) as client:
        deadline = time.monotonic() + 60
        while (body := client.get("/readyz").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/readyz").status_code == 503
        assert body["status"] == "failed"
        assert "text_encoder.onnx" in body["error"]
        assert "sha256" in body["error"]
        assert client.get("/healthz").status_code == 200
