"""The confidence floor a store serves with its default point (model.json ``router.min_confidence``): applied to the
requests that name no point and set no floor, shown by GET /v1/models/{name}, overridden by the setting."""

from __future__ import annotations

import json

import pytest
from conftest import b64


def classify_batch(client, samples, **fields) -> list[dict]:
    inputs = [{"image": b64(s["png"]), "text": s["text"]} for s in samples]
    response = client.post("/v1/classify/batch", json={"inputs": inputs, **fields})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def with_served_floor(store, floor) -> None:
    path = next(store.glob("shapes/*/model.json"))
    manifest = json.loads(path.read_text())
    manifest["router"]["min_confidence"] = floor
    path.write_text(json.dumps(manifest))


@pytest.fixture
def unsure(serve, samples) -> tuple[list[dict], dict, str]:
    """(samples the router sends down a path cheaper than the full one whose expert is less than sure, their expert
    by id, the full expert), from the router alone (DYNFUSE_MIN_CONFIDENCE=0 turns any floor off)."""
    alone = serve(min_confidence=0.0)
    model = alone.get("/v1/models/shapes").json()
    assert model["default_min_confidence"] == 0.0
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    full = model["full_expert"]
    answers = classify_batch(alone, samples[:48])
    assert all(a["route"]["decided_by"] == "router" for a in answers)
    picked = [
        (sample, answer["route"]["expert"])
        for sample, answer in zip(samples[:48], answers, strict=True)
        if cost[answer["route"]["expert"]] < cost[full] and max(answer["scores"].values()) < 0.999999
    ]
    assert len(picked) >= 3, "the router sends nothing cheaper than the full path: no floor can show"
    return [s for s, _ in picked], {s["id"]: e for s, e in picked}, full


def test_requests_that_name_no_point_get_the_stores_floor(serve, store_copy, unsure):
    cheaper, expert, full = unsure
    with_served_floor(store_copy, 1.0)  # every cheaper answer is less sure than this
    client = serve(store=store_copy)
    model = client.get("/v1/models/shapes").json()
    assert (model["default_min_confidence"], model["router"]["min_confidence"]) == (1.0, 1.0)

    for sample, answer in zip(cheaper, classify_batch(client, cheaper), strict=True):
        assert (answer["route"]["decided_by"], answer["route"]["expert"]) == ("confidence", full), sample["id"]
        assert answer["route"]["fallback_from"] == expert[sample["id"]]
    # A request that names the point, or sets its own floor, is served as it asked.
    named = classify_batch(client, cheaper, operating_point=model["default_operating_point"])
    own = classify_batch(client, cheaper, min_confidence=0.0)
    for answers in (named, own):
        assert [(a["route"]["decided_by"], a["route"]["expert"]) for a in answers] == [
            ("router", expert[s["id"]]) for s in cheaper
        ]


def test_the_setting_overrides_the_stores_floor(serve, store_copy, unsure):
    cheaper, expert, _ = unsure
    with_served_floor(store_copy, 1.0)
    client = serve(store=store_copy, min_confidence=0.0)

    assert client.get("/v1/models/shapes").json()["default_min_confidence"] == 0.0
    answers = classify_batch(client, cheaper)
    assert [(a["route"]["decided_by"], a["route"]["expert"]) for a in answers] == [
        ("router", expert[s["id"]]) for s in cheaper
    ]


def test_a_store_without_a_floor_serves_the_router_alone(serve, store_copy, unsure):
    cheaper, expert, _ = unsure
    with_served_floor(store_copy, None)
    client = serve(store=store_copy)

    assert client.get("/v1/models/shapes").json()["default_min_confidence"] is None
    answers = classify_batch(client, cheaper)
    assert [a["route"]["expert"] for a in answers] == [expert[s["id"]] for s in cheaper]
