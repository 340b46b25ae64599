"""Operating points, soft fusion, the confidence fallback and degrading under load, over HTTP v1 and v2."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import b64, scrape

POINTS = {"lambda_0", "lambda_0.3"}  # the tiny model's routers


@pytest.fixture
def client(serve):
    return serve()


def classify(client, sample, **fields):
    response = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_model_lists_its_operating_points_and_routes(client):
    model = client.get("/v1/models/shapes").json()

    points = model["operating_points"]
    assert {p["name"] for p in points} == POINTS
    assert [p["name"] for p in points if p["default"]] == [model["default_operating_point"]]
    assert model["default_operating_point"] == model["router"]["operating_point"]
    for point in points:
        assert 0 <= point["accuracy"] <= 1
        assert point["madds_per_sample"] > 0
        assert sum(point["route_mix"].values()) == pytest.approx(1.0)
    assert [p["madds_per_sample"] for p in points] == sorted(p["madds_per_sample"] for p in points)
    assert model["routes"] == ["auto", "soft", *(e["name"] for e in model["experts"])]


def test_every_answer_names_its_operating_point_and_a_request_can_pick_one(client, samples):
    default = client.get("/v1/models/shapes").json()["default_operating_point"]
    other = (POINTS - {default}).pop()

    assert classify(client, samples[0])["route"]["operating_point"] == default
    picked = classify(client, samples[0], operating_point=other)["route"]
    assert picked["operating_point"] == other
    assert picked["degraded"] is False


def test_an_unknown_operating_point_is_a_422_that_lists_the_valid_ones(client, samples):
    response = client.post("/v1/classify", json={"text": samples[0]["text"], "operating_point": "fast"})

    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "'fast'" in message
    assert all(point in message for point in POINTS)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_confidence_outside_0_1_is_a_422(client, samples, value):
    as_json = client.post("/v1/classify", json={"text": samples[0]["text"], "min_confidence": value})
    as_form = client.post("/v1/classify", data={"text": samples[0]["text"], "min_confidence": str(value)})

    assert (as_json.status_code, as_form.status_code) == (422, 422)
    assert "min_confidence" in as_form.json()["error"]["message"]


def test_soft_fusion_runs_every_expert_and_says_how_it_weighed_them(client, samples):
    manifest_experts = [e["name"] for e in client.get("/v1/models/shapes").json()["experts"]]
    body = classify(client, samples[0], route="soft")

    route = body["route"]
    assert (route["expert"], route["decided_by"]) == ("soft", "request")
    assert set(route["weights"]) == set(manifest_experts)
    assert sum(route["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    # Every expert ran: compute is at least every expert's path beyond the shared encoders and the router.
    forced = [classify(client, samples[0], route=e)["compute"]["madds"] for e in manifest_experts]
    assert body["compute"]["madds"] >= max(forced)


def test_soft_fusion_without_an_image_weighs_only_the_text_expert(client, samples):
    body = client.post("/v1/classify", json={"text": samples[0]["text"], "route": "soft"}).json()

    assert body["route"]["weights"]["text"] == pytest.approx(1.0)
    assert sum(w for e, w in body["route"]["weights"].items() if e != "text") == 0


def test_a_confidence_floor_of_one_hands_every_cheaper_answer_to_the_full_path(client, samples):
    model = client.get("/v1/models/shapes").json()
    full = model["full_expert"]
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    answers = [classify(client, s, min_confidence=1.0) for s in samples[:12]]

    for body in answers:
        route = body["route"]
        if route["decided_by"] == "confidence":
            assert route["expert"] == full
            assert cost[route["fallback_from"]] < cost[full]
            forced = classify(client, samples[0], route=full)
            assert body["compute"]["madds"] > forced["compute"]["madds"]  # both paths are counted
        else:  # the router chose the full path, or one dearer than it: nothing cheaper to fall back from
            assert cost[route["expert"]] >= cost[full]
            assert "fallback_from" not in route
    assert any(b["route"]["decided_by"] == "confidence" for b in answers)


def test_the_server_wide_confidence_floor_applies_when_a_request_sets_none(serve, samples):
    client = serve(min_confidence=1.0)
    model = client.get("/v1/models/shapes").json()
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    for sample in samples[:6]:
        alone = classify(client, sample, min_confidence=0.0)  # the request's own floor wins over the server's
        picked, sure = alone["route"]["expert"], max(alone["scores"].values()) >= 0.999999
        body = classify(client, sample, route="auto")
        decided = (body["route"]["decided_by"], body["route"]["expert"])
        if cost[picked] >= cost[model["full_expert"]]:  # the full path or a dearer one: nothing to fall back from
            assert decided == ("router", picked)
        elif not sure:  # a cheaper expert below a floor of 1 hands over to the full path
            assert decided == ("confidence", model["full_expert"])


def test_v2_takes_the_operating_point_and_min_confidence_as_parameters(client, samples):
    default = client.get("/v1/models/shapes").json()["default_operating_point"]
    other = (POINTS - {default}).pop()
    body = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [samples[0]["text"]]}],
        "parameters": {"operating_point": other, "min_confidence": 0.5, "route": "soft"},
    }
    response = client.post("/v2/models/shapes/infer", json=body)

    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["operating_point"] == [other]
    assert outputs["expert"] == ["soft"]
    bad = client.post("/v2/models/shapes/infer", json=body | {"parameters": {"operating_point": "nope"}})
    assert bad.status_code == 400
    assert all(point in bad.json()["error"] for point in POINTS)


def test_under_load_requests_are_served_at_the_cheaper_point_and_say_so(serve, samples):
    client = serve(degrade_to="lambda_0.3", degrade_high_water=2, degrade_low_water=0, max_batch_delay_ms=20)
    payloads = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:48]]

    with ThreadPoolExecutor(16) as pool:  # 16 clients at once: the queue passes 2
        responses = list(pool.map(lambda p: client.post("/v1/classify", json=p), payloads))

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    routes = [r.json()["route"] for r in responses]
    degraded = [r for r in routes if r["degraded"]]
    assert degraded, "48 requests from 16 clients never reached the high-water mark of 2"
    assert all(r["operating_point"] == "lambda_0.3" for r in degraded)
    normal = client.get("/v1/models/shapes").json()["default_operating_point"]
    assert all(r["operating_point"] == normal for r in routes if not r["degraded"])
    assert scrape(client)[("dynfuse_degraded_requests_total", (("model", "shapes"),))] == len(degraded)
    # A request that names its operating point is never degraded.
    assert classify(client, samples[0], operating_point="lambda_0")["route"]["operating_point"] == "lambda_0"


def test_a_degrade_point_the_model_lacks_keeps_the_server_unready_and_says_why(tiny_store):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(store=tiny_store, degrade_to="cheapest"))) as client:
        deadline = time.monotonic() + 60
        while (body := client.get("/readyz").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert body["status"] == "failed"
    assert "DYNFUSE_DEGRADE_TO='cheapest' is not an operating point" in body["error"]
    assert "lambda_0.3" in body["error"]


def test_water_marks_out_of_order_are_refused_when_the_settings_are_read():
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="must be below degrade_high_water"):
        Settings(degrade_to="lambda_0.3", degrade_high_water=4, degrade_low_water=4)


@pytest.mark.parametrize("point", sorted(POINTS))
def test_soft_fusion_of_an_image_alone_is_a_distribution_at_every_operating_point(client, samples, point):
    # lambda_0 always picks a two-modality expert: its weights for the image-only experts may all be ~0.
    body = client.post(
        "/v1/classify", json={"image": b64(samples[0]["png"]), "route": "soft", "operating_point": point}
    )

    assert body.status_code == 200, body.text
    weights = body.json()["route"]["weights"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert weights["text"] == 0
