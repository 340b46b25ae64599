"""The model repository while serving (Triton's repository extension): a version swapped under load answers
every request, the requests in flight finish on the version they started on; a broken version is refused
while the old one keeps answering; a model unloads and loads again; two models are served at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import b64

from export.store import sha256_file
from service.config import Settings
from service.main import create_app

LOAD = "/v2/repository/models/{}/load"
UNLOAD = "/v2/repository/models/{}/unload"


def publish(store: Path, version: str, *, name: str = "shapes", source: str = "shapes/1") -> Path:
    """What an export beside the server does: a new version (a copy of ``source``) appears in the store."""
    target = store / name / version
    shutil.copytree(store / source, target)
    manifest = json.loads((target / "model.json").read_text())
    manifest.update(name=name, version=version)
    (target / "model.json").write_text(json.dumps(manifest))
    return target


@contextlib.asynccontextmanager
async def running_app(store, **settings):
    app = create_app(Settings(store=store, **{"model_control": "explicit", **settings}))
    async with app.router.lifespan_context(app):
        for _ in range(600):
            if not app.state.repository.starting:  # every model asked for at start is loaded
                break
            await asyncio.sleep(0.05)
        assert app.state.service is not None, app.state.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dynfuse", timeout=60) as client:
            yield app, client


async def traffic(client, pair: dict, stop: asyncio.Event, answers: list, concurrency: int = 4) -> None:
    """Classify ``pair`` from ``concurrency`` clients until ``stop``; each answer's (status, version) to ``answers``."""

    async def one_client():
        while not stop.is_set():
            response = await client.post("/v1/classify", json=pair)
            answers.append((response.status_code, response.json().get("model_version")))

    await asyncio.gather(*(one_client() for _ in range(concurrency)))


def model_info(app) -> dict[str, float]:
    """dynfuse_model_info's value per (model, version)."""
    family = next(m for m in app.state.metrics.registry.collect() if m.name == "dynfuse_model_info")
    return {(s.labels["model"], s.labels["version"]): s.value for s in family.samples}


def test_a_version_swaps_under_load_with_every_request_answered(store_copy, samples):
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}

    async def scenario():
        async with running_app(store_copy, max_batch_delay_ms=2) as (app, client):
            old = app.state.service
            publish(store_copy, "2")
            stop, answers = asyncio.Event(), []
            load = asyncio.create_task(traffic(client, pair, stop, answers))
            while len(answers) < 10:
                await asyncio.sleep(0.01)
            swapped = await client.post(LOAD.format("shapes"), json={})
            during = len(answers)
            while len(answers) < during + 10:
                await asyncio.sleep(0.01)
            stop.set()
            await load
            deadline = time.monotonic() + 60  # the old version stops once its last request is answered
            while old.batcher.status() != "stopping" and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return swapped, answers, during, old, app

    swapped, answers, during, old, app = asyncio.run(scenario())
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["version"] == "2"
    assert swapped.json()["previous_version"] == "1"
    assert swapped.json()["load_seconds"] > 0
    assert [status for status, _ in answers if status != 200] == []
    assert {version for _, version in answers[:10]} == {"1"}
    # Requests still running at the swap may answer on version 1; every one sent after it answers on 2.
    assert {version for _, version in answers[during + 4 :]} == {"2"}
    assert old.batcher.status() == "stopping"
    assert model_info(app) == {("shapes", "2"): 1.0}


def test_requests_in_flight_at_the_swap_finish_on_the_version_they_started_on(store_copy, samples):
    pair = {"image": b64(samples[1]["png"]), "text": samples[1]["text"]}

    async def scenario():
        async with running_app(store_copy) as (app, client):
            old = app.state.service
            publish(store_copy, "2")
            # Hold the old version's runtime mid-batch, as a slow batch would: its requests are in flight.
            release, running = threading.Event(), threading.Event()
            real_predict = old.pipeline.predict

            def held_predict(items):
                running.set()
                release.wait(timeout=30)
                return real_predict(items)

            old.pipeline.predict = held_predict
            in_flight = [asyncio.create_task(client.post("/v1/classify", json=pair)) for _ in range(3)]
            await asyncio.to_thread(running.wait, 10)
            swapped = await client.post(LOAD.format("shapes"))
            after = await client.post("/v1/classify", json=pair)
            still_waiting = not any(task.done() for task in in_flight)
            release.set()
            return swapped, after, still_waiting, [await task for task in in_flight]

    swapped, after, still_waiting, held = asyncio.run(scenario())
    assert swapped.status_code == 200, swapped.text
    assert after.status_code == 200
    assert after.json()["model_version"] == "2"
    assert still_waiting  # the swap did not wait for them, nor cut them off
    assert [(r.status_code, r.json()["model_version"]) for r in held] == [(200, "1")] * 3


def tamper_a_byte(version_dir: Path) -> str:
    onnx_file = next(version_dir.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    return onnx_file.name


def test_a_corrupt_version_is_refused_under_load_and_the_old_one_keeps_answering(store_copy, samples):
    pair = {"image": b64(samples[2]["png"]), "text": samples[2]["text"]}

    async def scenario():
        async with running_app(store_copy) as (app, client):
            tampered = tamper_a_byte(publish(store_copy, "2"))
            stop, answers = asyncio.Event(), []
            load = asyncio.create_task(traffic(client, pair, stop, answers))
            while len(answers) < 5:
                await asyncio.sleep(0.01)
            refused = await client.post(LOAD.format("shapes"))
            during = len(answers)
            while len(answers) < during + 5:
                await asyncio.sleep(0.01)
            stop.set()
            await load
            index = await client.post("/v2/repository/index")
            return tampered, refused, answers, index.json(), app

    tampered, refused, answers, index, app = asyncio.run(scenario())
    assert refused.status_code == 400
    message = refused.json()["error"]
    assert tampered in message
    assert "sha256" in message
    assert "version 1 keeps serving" in message
    assert answers
    assert set(answers) == {(200, "1")}
    [entry] = index
    assert entry["name"] == "shapes"
    assert entry["version"] == "1"
    assert entry["state"] == "READY"
    assert "version 2 refused" in entry["reason"]
    assert entry["versions"] == ["1", "2"]
    assert model_info(app) == {("shapes", "1"): 1.0}


def test_a_version_that_fails_to_warm_up_is_refused(store_copy, samples):
    """Its hashes match (the file was exported broken), so only building and warming the runtime finds out."""

    async def scenario():
        async with running_app(store_copy) as (_app, client):
            publish_unloadable(store_copy, "2")
            refused = await client.post(LOAD.format("shapes"))
            answer = await client.post("/v1/classify", json={"text": samples[3]["text"]})
            return refused, answer

    refused, answer = asyncio.run(scenario())
    assert refused.status_code == 400
    assert "version 2 refused" in refused.json()["error"]
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "1"


def publish_unloadable(store: Path, version: str) -> None:
    broken = publish(store, version)
    manifest = json.loads((broken / "model.json").read_text())
    onnx_file = next(broken.glob("*.onnx"))
    onnx_file.write_bytes(b"not an onnx graph")
    for component in manifest["components"].values():
        for entry in component["files"].values():
            if entry["file"] == onnx_file.name:
                entry["sha256"] = sha256_file(onnx_file)
    (broken / "model.json").write_text(json.dumps(manifest))


def test_a_model_unloads_and_loads_again(serve, samples):
    client = serve(model_control="explicit")
    pair = {"image": b64(samples[4]["png"]), "text": samples[4]["text"]}
    assert client.post("/v1/classify", json=pair).status_code == 200

    unloaded = client.post(UNLOAD.format("shapes"), json={"parameters": {"unload_dependents": False}})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json() == {"name": "shapes", "version": "1", "state": "UNAVAILABLE"}
    refused = client.post("/v1/classify", json=pair)
    assert refused.status_code == 503
    assert "no model is served" in refused.json()["error"]["message"]
    assert client.get("/readyz").status_code == 503
    assert client.get("/v1/models").json() == {"models": []}
    [entry] = client.post("/v2/repository/index", json={"ready": False}).json()
    assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
    assert client.post("/v2/repository/index", json={"ready": True}).json() == []
    assert "dynfuse_model_info{" not in client.get("/metrics").text
    assert client.post(UNLOAD.format("shapes")).json()["version"] is None  # again: nothing to do, not an error

    loaded = client.post(LOAD.format("shapes"))
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["previous_version"] is None
    answer = client.post("/v1/classify", json=pair)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "1"
    assert client.get("/readyz").status_code == 200
    assert (
        'dynfuse_model_info{backend="onnx",device="cpu",model="shapes",version="1"} 1.0' in client.get("/metrics").text
    )


def test_with_default_settings_load_and_unload_are_refused_and_the_index_is_readable(serve, samples):
    client = serve()
    for call in (LOAD, UNLOAD):
        refused = client.post(call.format("shapes"))
        assert refused.status_code == 403
        assert "DYNFUSE_MODEL_CONTROL=none" in refused.json()["error"]
        assert "DYNFUSE_MODEL_CONTROL=explicit" in refused.json()["error"]  # and how to turn it on
    [entry] = client.post("/v2/repository/index").json()
    assert (entry["name"], entry["state"]) == ("shapes", "READY")
    assert client.post("/v1/classify", json={"text": samples[0]["text"]}).status_code == 200  # still served


def test_with_the_store_polled_explicit_calls_are_refused(serve):
    client = serve(model_control="poll", admin_key="admin")
    refused = client.post(UNLOAD.format("shapes"), headers={"Authorization": "Bearer admin"})
    assert refused.status_code == 403
    assert "DYNFUSE_MODEL_CONTROL=poll" in refused.json()["error"]
    assert client.get("/readyz").status_code == 200


def test_control_calls_need_the_admin_key_and_inference_keys_never_do(serve, tmp_path, samples):
    keys = tmp_path / "keys"
    keys.write_text("ci: ci-key\n")
    client = serve(model_control="explicit", api_key="inference", api_keys_file=keys, admin_key="admin-key")
    for headers in ({}, {"Authorization": "Bearer inference"}, {"Authorization": "Bearer ci-key"}):
        for call in (LOAD, UNLOAD):
            refused = client.post(call.format("shapes"), headers=headers)
            assert refused.status_code == 401, refused.text
            assert "admin key" in refused.json()["error"]
    admin = {"Authorization": "Bearer admin-key"}
    assert client.post("/v1/classify", json={"text": "a red circle"}, headers=admin).status_code == 401
    for headers in (admin, {"Authorization": "Bearer ci-key"}):  # the index: any valid key
        assert client.post("/v2/repository/index", headers=headers).status_code == 200
    assert client.post("/v2/repository/index").status_code == 401
    assert client.post(UNLOAD.format("shapes"), headers=admin).json()["state"] == "UNAVAILABLE"
    assert client.post(LOAD.format("shapes"), headers=admin).json()["state"] == "READY"


def test_the_repository_api_refuses_what_it_cannot_do(serve):
    client = serve(api_key="secret", admin_key="admin", model_control="explicit")
    assert client.post(LOAD.format("shapes")).status_code == 401
    assert client.post(LOAD.format("shapes"), headers={"Authorization": "Bearer secret"}).status_code == 401
    auth = {"Authorization": "Bearer admin"}
    missing = client.post(LOAD.format("nope"), headers=auth)
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]
    assert client.post(LOAD.format("shapes"), headers=auth, json={"parameters": {"version": "9"}}).status_code == 404
    config = client.post(LOAD.format("shapes"), headers=auth, json={"parameters": {"config": "{}"}})
    assert config.status_code == 400
    assert "config" in config.json()["error"]
    assert client.post("/v2/repository/index", headers=auth, content=b"{not json").status_code == 400
    same = client.post(LOAD.format("shapes"), headers=auth, json={"parameters": {"version": "1"}})
    assert same.json() == {
        "name": "shapes",
        "version": "1",
        "previous_version": "1",
        "state": "READY",
        "load_seconds": 0,
    }
    assert "model_repository" in client.get("/v2").json()["extensions"]


@pytest.fixture
def two_model_store(store_copy) -> Path:
    publish(store_copy, "1", name="shapes_b")
    return store_copy


def test_two_models_are_served_at_once_each_with_its_own_batcher(two_model_store, samples):
    pair = {"image": b64(samples[5]["png"]), "text": samples[5]["text"]}

    async def scenario():
        async with running_app(two_model_store, model="shapes", models="*") as (app, client):
            listed = (await client.get("/v1/models")).json()
            default, other, unknown = await asyncio.gather(
                client.post("/v1/classify", json=pair),
                client.post("/v1/classify", json={**pair, "model": "shapes_b"}),
                client.post("/v1/classify", json={**pair, "model": "nope"}),
            )
            form = await client.post("/v1/classify", data={"text": pair["text"], "model": "shapes_b"})
            batch = await client.post("/v1/classify/batch", json={"inputs": [pair, pair], "model": "shapes_b"})
            v2 = await client.post(
                "/v2/models/shapes_b/infer",
                json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [pair["text"]]}]},
            )
            batchers = {name: service.batcher for name, service in app.state.repository.models.items()}
            registry = app.state.metrics.registry
            batches = {m: registry.get_sample_value("dynfuse_batch_size_count", {"model": m}) for m in batchers}
            return listed, default, other, unknown, form, batch, v2, batchers, batches

    listed, default, other, unknown, form, batch, v2, batchers, batches = asyncio.run(scenario())
    assert [m["name"] for m in listed["models"]] == ["shapes", "shapes_b"]
    assert default.json()["model"] == "shapes"
    assert other.status_code == 200
    assert other.json()["model"] == "shapes_b"
    assert other.json()["label"] == default.json()["label"]  # the same weights under another name
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]["message"]
    assert form.status_code == 200
    assert form.json()["model"] == "shapes_b"
    assert batch.status_code == 200
    assert batch.json()["model"] == "shapes_b"
    assert v2.status_code == 200
    assert v2.json()["model_name"] == "shapes_b"
    assert batchers["shapes"] is not batchers["shapes_b"]
    assert batches["shapes"] >= 1
    assert batches["shapes_b"] >= 3


def test_racing_loads_on_two_workers_end_with_the_one_asked_last_on_both(store_copy, tmp_path, monkeypatch):
    """Two apps sharing a state file are two workers. Worker A is asked for version 2 (slow to warm up), then
    worker B for version 1: B finishes first, A later; both end on version 1, the call asked last, and A's
    answer says that its load was superseded."""
    from service.inference import InferenceService
    from service.repository_sync import STATE_FILE_ENV, SharedState

    publish(store_copy, "2")
    shared = SharedState(tmp_path / "served.json")
    shared.write({"shapes": "2"})  # both start on version 2, then the race: 1 asked second
    monkeypatch.setenv(STATE_FILE_ENV, str(shared.path))
    release = threading.Event()
    real_load = InferenceService.load

    def slow_version_3(settings, metrics, **options):
        if settings.model_version == "3":
            release.wait(timeout=60)
        return real_load(settings, metrics, **options)

    monkeypatch.setattr(InferenceService, "load", staticmethod(slow_version_3))
    publish(store_copy, "3")

    async def scenario():
        async with running_app(store_copy) as (a, client_a), running_app(store_copy) as (b, client_b):
            first = asyncio.create_task(client_a.post(LOAD.format("shapes"), json={"parameters": {"version": "3"}}))
            while "shapes" not in a.state.repository._loading:  # asked (ticket taken), now warming up
                await asyncio.sleep(0.01)
            second = await client_b.post(LOAD.format("shapes"), json={"parameters": {"version": "1"}})
            release.set()
            first = await first
            for _ in range(600):  # both follow the file; A goes back from 3 to 1
                if a.state.repository.versions() == b.state.repository.versions() == {"shapes": "1"}:
                    break
                await asyncio.sleep(0.05)
            return first, second, a.state.repository.versions(), b.state.repository.versions()

    first, second, on_a, on_b = asyncio.run(scenario())
    assert second.status_code == 200, second.text
    assert second.json()["version"] == "1"
    assert first.status_code == 409, first.text
    assert "asked after this one" in first.json()["error"]
    assert on_a == on_b == {"shapes": "1"}
    assert shared.wanted() == {"shapes": "1"}


def test_no_lock_or_entry_is_made_for_a_model_name_that_does_not_exist(serve):
    client = serve(model_control="explicit")
    repository = client.app.state.repository
    for name in ("nope", "x" * 200, "../shapes", "shapes_b"):
        for call in (LOAD, UNLOAD):
            assert client.post(call.format(name)).status_code == 404
    assert set(repository._locks) <= {"shapes"}
    assert set(repository._reasons) <= {"shapes"}


def test_a_version_refused_after_it_loaded_never_shows_in_model_info(store_copy):
    """Version 2 verifies, builds and warms up, but its model.json names another version than where it is stored:
    refused at the last step, and dynfuse_model_info never showed it."""

    async def scenario():
        async with running_app(store_copy) as (app, client):
            misplaced = publish(store_copy, "2")
            manifest = json.loads((misplaced / "model.json").read_text())
            manifest["version"] = "7"
            (misplaced / "model.json").write_text(json.dumps(manifest))
            refused = await client.post(LOAD.format("shapes"))
            return refused, model_info(app)

    refused, info = asyncio.run(scenario())
    assert refused.status_code == 400
    assert "stored as shapes/2" in refused.json()["error"]
    assert info == {("shapes", "1"): 1.0}


def wait_for(condition, what: str, timeout: float = 60.0):
    """Poll ``condition`` until it is true; a generous deadline, since the machine may be loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.mark.parametrize(("store_poll_s", "interval"), [(0.2, 0.2), (None, 15.0)])
def test_with_the_store_polled_a_new_version_is_served_without_a_call(
    serve, store_copy, samples, monkeypatch, store_poll_s, interval
):
    import service.main

    intervals = []
    real_poll = service.main.poll_store

    def recorded_poll(repository, interval_s):
        intervals.append(interval_s)
        return real_poll(repository, interval_s)

    monkeypatch.setattr(service.main, "poll_store", recorded_poll)
    client = serve(store=store_copy, model_control="poll", store_poll_s=store_poll_s)
    assert intervals == [interval]  # DYNFUSE_STORE_POLL_S, or Triton's 15 s when unset
    if store_poll_s is None:
        return  # 15 s is too long to wait here; the same loop, at 0.2 s, swaps below
    pair = {"text": samples[0]["text"]}
    assert client.post("/v1/classify", json=pair).json()["model_version"] == "1"

    publish(store_copy, "2")

    wait_for(lambda: client.post("/v1/classify", json=pair).json()["model_version"] == "2", "no swap to version 2")
    [entry] = client.post("/v2/repository/index").json()
    assert (entry["name"], entry["version"], entry["state"]) == ("shapes", "2", "READY")


def test_models_named_in_a_list_are_served_from_the_start_and_no_others(serve, store_copy, samples):
    for name in ("shapes_b", "shapes_c", "shapes_d"):
        publish(store_copy, "1", name=name)
    client = serve(store=store_copy, model="shapes", models="shapes_c, shapes_b ,")  # DYNFUSE_MODELS as users write it

    assert sorted(m["name"] for m in client.get("/v1/models").json()["models"]) == ["shapes", "shapes_b", "shapes_c"]
    pair = {"text": samples[0]["text"]}
    for name in ("shapes_b", "shapes_c"):
        answer = client.post("/v1/classify", json={**pair, "model": name})
        assert (answer.status_code, answer.json()["model"]) == (200, name)
    refused = client.post("/v1/classify", json={**pair, "model": "shapes_d"})  # in the store, not in the list
    assert refused.status_code == 404, refused.text
    states = {entry["name"]: entry["state"] for entry in client.post("/v2/repository/index").json()}
    assert states == {"shapes": "READY", "shapes_b": "READY", "shapes_c": "READY", "shapes_d": "UNAVAILABLE"}
