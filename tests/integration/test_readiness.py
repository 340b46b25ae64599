"""Readiness tells the truth: a model whose pipeline fails every batch (a lost device, a broken session) is taken
out of rotation with the reason, and comes back by itself once it answers again; with several models served,
one model's trouble leaves the others ready."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import b64

from service.batcher import UNHEALTHY_AFTER


def break_pipeline(service) -> threading.Event:
    """The returned event, while set, makes every call of ``service``'s pipeline fail as a lost device does."""
    broken = threading.Event()
    real = service.pipeline.predict

    def predict(items):
        if broken.is_set():
            raise RuntimeError("CUDA error: device lost")
        return real(items)

    service.pipeline.predict = predict
    return broken


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_a_pipeline_failing_every_batch_makes_readiness_503_with_the_reason_and_it_recovers(serve, samples):
    client = serve()
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}
    assert client.post("/v1/classify", json=pair).status_code == 200
    broken = break_pipeline(client.app.state.service)
    broken.set()
    failures = [client.post("/v1/classify", json=pair) for _ in range(UNHEALTHY_AFTER)]
    assert [f.status_code for f in failures] == [500] * UNHEALTHY_AFTER  # the server's fault, not the client's

    ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 503 and r, "/readyz 503")
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith(f"the last {UNHEALTHY_AFTER} batches failed for every request")
    assert "CUDA error: device lost" in body["reason"]
    model = client.get("/v2/models/shapes/ready")
    assert model.status_code == 503
    assert "device lost" in model.json()["reason"]
    assert client.get("/v2/health/ready").status_code == 503
    refused = client.post("/v1/classify", json=pair)  # answered at once, with the reason and Retry-After
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "device lost" in refused.json()["error"]["message"]

    broken.clear()  # the device is back; no request is needed for the server to notice
    wait_for(lambda: client.get("/readyz").status_code == 200, "/readyz 200 again")
    assert client.get("/v2/models/shapes/ready").json() == {"name": "shapes", "ready": True}
    assert client.post("/v1/classify", json=pair).status_code == 200


@pytest.fixture
def two_models(store_copy) -> Path:
    target = store_copy / "shapes_b" / "1"
    shutil.copytree(store_copy / "shapes" / "1", target)
    manifest = json.loads((target / "model.json").read_text())
    manifest.update(name="shapes_b")
    (target / "model.json").write_text(json.dumps(manifest))
    return store_copy


def test_one_models_trouble_leaves_the_other_models_in_rotation(serve, two_models, samples):
    client = serve(store=two_models, model="shapes", models="*")
    broken = break_pipeline(client.app.state.repository.models["shapes_b"])
    broken.set()
    for _ in range(UNHEALTHY_AFTER):
        assert client.post("/v1/classify", json={"text": "a red circle", "model": "shapes_b"}).status_code == 500
    wait_for(lambda: client.get("/v2/models/shapes_b/ready").status_code == 503, "shapes_b not ready")

    ready = client.get("/readyz")
    assert ready.status_code == 200
    states = ready.json()["states"]
    assert states["shapes"] == {"version": "1", "ready": True, "reason": ""}
    assert states["shapes_b"]["ready"] is False
    assert "device lost" in states["shapes_b"]["reason"]
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/shapes/ready").status_code == 200
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}
    assert client.post("/v1/classify", json=pair).status_code == 200
    assert client.post("/v1/classify", json={**pair, "model": "shapes_b"}).status_code == 503
