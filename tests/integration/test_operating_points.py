"""Operating points, soft fusion, the confidence fallback and degrading under load, over HTTP v1 and v2."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import b64, scrape

POINTS = {"lambda_0", "lambda_0.3"}  # two of the served model's routers (the default model trains 8)


@pytest.fixture
def client(serve):
    return serve()


def classify(client, sample, **fields):
    response = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def classify_batch(client, samples, **fields) -> list[dict]:
    """Every sample's answer, through /v1/classify/batch (64 inputs a call, the default limit)."""
    answers = []
    for start in range(0, len(samples), 64):
        inputs = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[start : start + 64]]
        response = client.post("/v1/classify/batch", json={"inputs": inputs, **fields})
        assert response.status_code == 200, response.text
        answers += response.json()["outputs"]
    return answers


def points_of(client) -> tuple[str, str]:
    """(the default operating point, the cheapest other one by its recorded MAdds per sample)."""
    model = client.get("/v1/models/shapes").json()
    default = model["default_operating_point"]
    others = [p for p in model["operating_points"] if p["name"] != default]
    return default, min(others, key=lambda p: p["madds_per_sample"])["name"]


def routed_apart(client, samples) -> tuple[list[dict], dict, dict]:
    """The samples whose expert differs between the default point and another, with each point's (expert, madds)
    per sample id, each asked by naming the point: a setting that picks a point is proven on these by what ran."""
    default, other = points_of(client)
    picks = {
        point: {s["id"]: (a["route"]["expert"], a["compute"]["madds"]) for s, a in zip(
            samples, classify_batch(client, samples, operating_point=point), strict=True)}
        for point in (default, other)
    }  # fmt: skip
    apart = [s for s in samples if picks[default][s["id"]][0] != picks[other][s["id"]][0]]
    assert len(apart) >= 4, f"{default} and {other} route the test split alike: nothing here can tell them apart"
    return apart, picks[default], picks[other]


def test_the_model_lists_its_operating_points_and_routes(client, manifest):
    model = client.get("/v1/models/shapes").json()

    points = model["operating_points"]
    assert {p["name"] for p in points} == {r["name"] for r in manifest["routers"]} >= POINTS
    assert [p["name"] for p in points if p["default"]] == [model["default_operating_point"]]
    assert model["default_operating_point"] == model["router"]["operating_point"]
    for point in points:
        assert 0 <= point["accuracy"] <= 1
        assert point["madds_per_sample"] > 0
        assert sum(point["route_mix"].values()) == pytest.approx(1.0)
    assert [p["madds_per_sample"] for p in points] == sorted(p["madds_per_sample"] for p in points)
    assert model["routes"] == ["auto", "soft", *(e["name"] for e in model["experts"])]


def test_each_operating_point_serves_its_own_routes_ranked_by_its_recorded_madds(client, samples):
    """What a point means is its router's decisions: over the test split, the points' route mixes differ and their
    MAdds per sample rank as model.json's validation figures (measured in training, in PyTorch) rank them."""
    served = {}
    for point in client.get("/v1/models/shapes").json()["operating_points"]:
        answers = classify_batch(client, samples, operating_point=point["name"])
        assert {a["route"]["operating_point"] for a in answers} == {point["name"]}
        mix = Counter(a["route"]["expert"] for a in answers)
        madds = sum(a["compute"]["madds"] for a in answers) / len(answers)
        served[point["name"]] = (point["madds_per_sample"], madds, mix)
    by_record = sorted(served, key=lambda name: served[name][0])
    cheapest, dearest = served[by_record[0]], served[by_record[-1]]
    assert dearest[1] > 1.1 * cheapest[1], served  # a different router decided: not the same routes renamed
    assert cheapest[2] != dearest[2]
    ranked = [served[name][1] for name in by_record]
    assert all(a <= b * 1.05 for a, b in zip(ranked, ranked[1:], strict=False)), served  # in order, up to noise


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


@pytest.mark.parametrize("point", sorted(POINTS))
def test_soft_fusion_answers_the_weighted_mix_of_the_forced_experts_probabilities(client, samples, point):
    """DRDF's soft fusion, checked against its definition: sum over experts of weight x that expert's probabilities,
    each expert's probabilities as the server gives them when the request forces it."""
    labels = client.get("/v1/models/shapes").json()["labels"]
    experts = [e["name"] for e in client.get("/v1/models/shapes").json()["experts"]]
    # The samples the router weighs most evenly: a sharp router gives most samples one expert almost whole, and the
    # definition is only put to the test where two or more experts count.
    answers = classify_batch(client, samples, route="soft", operating_point=point)
    evenness = {s["id"]: -max(a["route"]["weights"].values()) for s, a in zip(samples, answers, strict=True)}
    mixed_samples = sorted(samples, key=lambda s: evenness[s["id"]], reverse=True)[:4]
    mixes = 0
    for sample in mixed_samples:
        soft = classify(client, sample, route="soft", operating_point=point)
        weights = soft["route"]["weights"]
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
        mixes += sum(w > 0.01 for w in weights.values()) >= 2  # a mix, not one expert in disguise
        forced = {e: classify(client, sample, route=e, operating_point=point)["scores"] for e in experts}
        mixed = {k: sum(weights[e] * forced[e][k] for e in experts) for k in labels}
        assert soft["scores"] == pytest.approx(mixed, abs=1e-4), sample["id"]
        assert soft["label"] == max(mixed, key=mixed.get)
    assert mixes >= 2, f"the router at {point} gives every test sample to one expert: no mix to check"


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
    plain = serve()
    model = plain.get("/v1/models/shapes").json()
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    full = model["full_expert"]
    # The samples the router sends down a path cheaper than the full one, less sure than a floor of 1.
    cheaper = [
        (sample, answer)
        for sample, answer in zip(samples[:40], classify_batch(plain, samples[:40]), strict=True)
        if cost[answer["route"]["expert"]] < cost[full] and max(answer["scores"].values()) < 0.999999
    ]
    assert len(cheaper) >= 3, "the router sends nothing cheaper than the full path: the floor cannot show"

    client = serve(min_confidence=1.0)
    for sample, routed in cheaper:
        body = classify(client, sample, route="auto")
        assert (body["route"]["decided_by"], body["route"]["expert"]) == ("confidence", full), sample["id"]
        assert body["route"]["fallback_from"] == routed["route"]["expert"]
        assert body["compute"]["madds"] > routed["compute"]["madds"]  # the full path ran too
        alone = classify(client, sample, min_confidence=0.0)  # the request's own floor wins over the server's
        assert (alone["route"]["decided_by"], alone["route"]["expert"]) == ("router", routed["route"]["expert"])


def test_the_server_wide_operating_point_is_what_requests_that_name_none_get(serve, samples):
    plain = serve()
    default, other = points_of(plain)
    apart, at_default, at_other = routed_apart(plain, samples)

    client = serve(operating_point=other)
    answers = classify_batch(client, apart)
    assert [(a["route"]["expert"], a["compute"]["madds"]) for a in answers] == [at_other[s["id"]] for s in apart]
    assert all(at_other[s["id"]] != at_default[s["id"]] for s in apart)  # not the routes of the store's default
    assert {a["route"]["operating_point"] for a in answers} == {other}
    named = classify_batch(client, apart, operating_point=default)  # a request that names one still gets it
    assert [(a["route"]["expert"], a["compute"]["madds"]) for a in named] == [at_default[s["id"]] for s in apart]


def test_a_batch_call_applies_its_route_threshold_point_and_floor_to_every_input(client, samples):
    model = client.get("/v1/models/shapes").json()
    cost = {e["name"]: e["path_madds"] for e in model["experts"]}
    full = model["full_expert"]
    default, other = points_of(client)
    rows = samples[:24]
    routed = classify_batch(client, rows)
    one_by_one = [classify(client, s) for s in rows]
    decisions = ("expert", "decided_by", "operating_point")
    assert [[a["route"][k] for k in decisions] for a in routed] == [
        [a["route"][k] for k in decisions] for a in one_by_one
    ]
    assert any(cost[a["route"]["expert"]] < cost[full] for a in routed)  # so threshold and floor can show

    forced = classify_batch(client, rows, route="image")
    assert {(a["route"]["expert"], a["route"]["decided_by"]) for a in forced} == {("image", "request")}

    escalated = classify_batch(client, rows, threshold=1.0)
    for before, after in zip(routed, escalated, strict=True):
        cheaper = cost[before["route"]["expert"]] < cost[full]
        expected = (full, "threshold") if cheaper else (before["route"]["expert"], "router")
        assert (after["route"]["expert"], after["route"]["decided_by"]) == expected

    floored = classify_batch(client, rows, min_confidence=1.0)
    for before, after in zip(routed, floored, strict=True):
        kept = [after["route"][k] for k in decisions] == [before["route"][k] for k in decisions]
        fell_back = (after["route"]["expert"], after["route"]["decided_by"]) == (full, "confidence")
        if cost[before["route"]["expert"]] >= cost[full]:
            assert kept
        elif max(before["scores"].values()) < 0.999999:
            assert fell_back
        else:  # a top score that rounds to 1: its calibrated confidence may still be below the floor
            assert kept or fell_back

    apart, _, at_other = routed_apart(client, samples)
    at_point = classify_batch(client, apart, operating_point=other)
    assert [(a["route"]["expert"], a["compute"]["madds"]) for a in at_point] == [at_other[s["id"]] for s in apart]


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
    cheap = points_of(serve())[1]
    # No confidence floor: requests that name no point are served as routed_apart's, which name it.
    client = serve(
        degrade_to=cheap, degrade_high_water=2, degrade_low_water=0, max_batch_delay_ms=20, min_confidence=0.0
    )
    normal = client.get("/v1/models/shapes").json()["default_operating_point"]
    # Only samples the two routers send down different paths: what ran proves which router decided, not the label.
    apart, at_normal, at_cheap = routed_apart(client, samples)
    payloads = [(s["id"], {"image": b64(s["png"]), "text": s["text"]}) for s in (apart * 48)[:48]]

    with ThreadPoolExecutor(16) as pool:  # 16 clients at once: the queue passes 2
        responses = list(pool.map(lambda p: (p[0], client.post("/v1/classify", json=p[1])), payloads))

    assert all(r.status_code == 200 for _, r in responses), [r.text for _, r in responses if r.status_code != 200]
    answers = [(sample_id, r.json()) for sample_id, r in responses]
    degraded = [(i, a) for i, a in answers if a["route"]["degraded"]]
    assert degraded, "48 requests from 16 clients never reached the high-water mark of 2"
    for sample_id, answer in answers:
        expected = at_cheap[sample_id] if answer["route"]["degraded"] else at_normal[sample_id]
        assert (answer["route"]["expert"], answer["compute"]["madds"]) == expected, sample_id
        assert answer["route"]["operating_point"] == (cheap if answer["route"]["degraded"] else normal)
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
