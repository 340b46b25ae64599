"""HTTP API v1 against a real tiny model: the response contract, routing, metadata, auth."""

from __future__ import annotations

import json

import pytest
from conftest import b64, scrape, value

TEXT_V2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a red circle"]}]}
EXPERTS = {"text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse"}


@pytest.fixture
def client(serve):
    return serve()


@pytest.fixture(scope="module")
def manifest(tiny_store) -> dict:
    return json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())


def component_madds(manifest: dict, *names: str) -> int:
    return sum(manifest["components"][n]["madds"] for n in names)


def expert_components(manifest: dict, expert: str) -> list[str]:
    return next(e["components"] for e in manifest["experts"] if e["name"] == expert)


def attribution_madds(manifest: dict, expert: str) -> int:
    """What ``expert``'s default attribution costs (model.json); none for a model exported before attribution."""
    return manifest["attribution"]["experts"][expert]["madds"] if "attribution" in manifest else 0


def routed_madds(manifest: dict, expert: str) -> int:
    """A request with both modalities routed to ``expert``: its path and its default attribution (model.json)."""
    path = next(e for e in manifest["experts"] if e["name"] == expert)["path_madds"]
    return path + attribution_madds(manifest, expert)


def test_classify_json_answers_with_every_contract_field(client, samples, manifest):
    sample = samples[0]
    response = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"]})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "shapes"
    assert body["model_version"] == "1"
    assert set(body["scores"]) == set(manifest["labels"])
    assert body["label"] == max(body["scores"], key=body["scores"].get)
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["route"]["expert"] in EXPERTS
    assert body["route"]["decided_by"] == "router"
    assert set(body["route"]["scores"]) == EXPERTS
    assert sum(body["route"]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["route"]["expert"] == max(body["route"]["scores"], key=body["route"]["scores"].get)
    assert body["importance"]["text"] + body["importance"]["image"] == pytest.approx(1.0, abs=1e-5)
    madds = routed_madds(manifest, body["route"]["expert"])
    assert body["compute"]["madds"] == madds
    assert body["compute"]["madds_full"] == manifest["madds_full"]
    assert body["compute"]["saved_ratio"] == pytest.approx(1 - madds / manifest["madds_full"], abs=1e-5)
    assert body["compute"]["attribution_madds"] == attribution_madds(manifest, body["route"]["expert"])
    assert body["route"]["modality_weights"]["text"] + body["route"]["modality_weights"]["image"] == pytest.approx(1.0)
    assert "explanation" not in body  # only when asked
    assert set(body["timing_ms"]) == {"queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] >= 0
    assert response.headers["x-request-id"] == body["id"]


def test_multipart_and_json_give_the_same_answer(client, samples):
    sample = samples[1]
    as_json = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"]}).json()
    as_form = client.post(
        "/v1/classify", files={"image": ("x.png", sample["png"], "image/png")}, data={"text": sample["text"]}
    ).json()

    assert as_form["label"] == as_json["label"]
    assert as_form["route"] == as_json["route"]
    assert as_form["scores"] == as_json["scores"]


def test_without_an_image_only_the_text_expert_runs(client, samples, manifest):
    body = client.post("/v1/classify", json={"text": samples[0]["text"]}).json()

    assert body["route"]["expert"] == "text"
    assert body["route"]["decided_by"] == "missing_modality"
    assert body["importance"] == {"text": 1.0, "image": 0.0}
    assert body["route"]["modality_weights"] == {"text": 1.0, "image": 0.0}  # DRDF: a modality alone weighs 1
    assert body["compute"]["madds"] == component_madds(
        manifest, "text_encoder", manifest["router"]["component"], "text_head"
    )


def best_image_only_expert(manifest: dict, scores: dict) -> str:
    """The contract's rule for a request without text: the best-scored expert that reads the image alone."""
    image_only = [e["name"] for e in manifest["experts"] if e["modalities"] == ["image"]]
    assert sorted(image_only) == ["image", "image_lite"]
    return max(image_only, key=lambda name: scores[name])


def test_without_text_only_the_image_expert_runs(client, samples, manifest):
    for sample in samples[:24]:
        body = client.post("/v1/classify", json={"image": b64(sample["png"])}).json()

        expert = best_image_only_expert(manifest, body["route"]["scores"])
        assert body["route"]["expert"] == expert
        assert body["route"]["decided_by"] == "missing_modality"
        assert body["importance"] == {"text": 0.0, "image": 1.0}
        assert body["route"]["modality_weights"] == {"text": 0.0, "image": 1.0}
        assert body["compute"]["madds"] == component_madds(
            manifest, "image_glimpse", manifest["router"]["component"], *expert_components(manifest, expert)
        )


def test_a_blank_text_counts_as_missing(client, samples, manifest):
    body = client.post("/v1/classify", json={"image": b64(samples[0]["png"]), "text": "   "}).json()

    without_text = client.post("/v1/classify", json={"image": b64(samples[0]["png"])}).json()
    expected = best_image_only_expert(manifest, body["route"]["scores"])
    assert (body["route"]["expert"], body["route"]["decided_by"]) == (expected, "missing_modality")
    assert body["route"] == without_text["route"]  # the same image-only choice as with no text at all
    assert body["importance"] == {"text": 0.0, "image": 1.0}


@pytest.mark.parametrize("expert", sorted(EXPERTS))
def test_a_forced_route_runs_that_expert(client, samples, manifest, expert):
    body = client.post(
        "/v1/classify", json={"image": b64(samples[2]["png"]), "text": samples[2]["text"], "route": expert}
    ).json()

    assert body["route"]["expert"] == expert
    assert body["route"]["decided_by"] == "request"
    assert body["compute"]["madds"] == routed_madds(manifest, expert)


def test_threshold_zero_is_the_router_and_one_is_the_full_path_from_every_cheaper_pick(client, samples, manifest):
    full = manifest["full_expert"]
    cost = {e["name"]: e["path_madds"] for e in manifest["experts"]}
    for sample in samples[:12]:
        pair = {"image": b64(sample["png"]), "text": sample["text"]}
        auto = client.post("/v1/classify", json=pair).json()
        zero = client.post("/v1/classify", json=pair | {"threshold": 0.0}).json()
        one = client.post("/v1/classify", json=pair | {"threshold": 1.0}).json()

        assert zero["route"] == auto["route"]
        picked = auto["route"]["expert"]
        escalates = cost[picked] < cost[full]  # from a path dearer than the full one, escalating saves nothing
        assert one["route"]["expert"] == (full if escalates else picked)
        assert one["route"]["decided_by"] == ("threshold" if escalates else "router")


def test_threshold_and_confidence_floor_never_escalate_from_an_expert_dearer_than_the_full_path(
    serve, store_copy, samples
):
    """A store whose every expert but the full one costs more than the full path: neither knob moves anything."""
    [manifest_path] = store_copy.glob("shapes/*/model.json")
    manifest = json.loads(manifest_path.read_text())
    full = manifest["full_expert"]
    dearest = max(e["path_madds"] for e in manifest["experts"])
    for entry in manifest["experts"]:
        if entry["name"] != full:
            entry["path_madds"] = dearest * 2
    manifest_path.write_text(json.dumps(manifest))
    client = serve(store=store_copy)
    pairs = [{"image": b64(s["png"]), "text": s["text"]} for s in samples[:16]]
    auto = [client.post("/v1/classify", json=pair).json()["route"] for pair in pairs]
    assert any(route["expert"] != full for route in auto)  # some picks are not the full path: the test can fail
    for pair, routed in zip(pairs, auto, strict=True):
        for knob in ({"threshold": 1.0}, {"min_confidence": 1.0}):
            route = client.post("/v1/classify", json=pair | knob).json()["route"]
            assert (route["expert"], route["decided_by"]) == (routed["expert"], "router"), knob


def test_batch_answers_each_input_in_order_with_its_id(client, samples):
    inputs = [{"id": f"s{i}", "image": b64(s["png"]), "text": s["text"]} for i, s in enumerate(samples[:5])]
    inputs.append({"text": samples[5]["text"]})  # no id: its position
    response = client.post("/v1/classify/batch", json={"inputs": inputs})

    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [o["id"] for o in outputs] == ["s0", "s1", "s2", "s3", "s4", "5"]
    single = client.post("/v1/classify", json={"image": inputs[2]["image"], "text": inputs[2]["text"]}).json()
    assert outputs[2]["label"] == single["label"]
    assert outputs[2]["route"] == single["route"]
    assert outputs[5]["route"]["expert"] == "text"


def test_models_endpoints_describe_experts_and_router(client, manifest):
    listing = client.get("/v1/models").json()["models"]
    one = client.get("/v1/models/shapes").json()

    assert listing == [one]
    assert one["labels"] == manifest["labels"]
    assert {e["name"]: e["modalities"] for e in one["experts"]} == {
        "text": ["text"],
        "image_lite": ["image"],
        "image": ["image"],
        "late_fusion": ["text", "image"],
        "mulmix": ["text", "image"],
        "mi2p": ["text", "image"],
        "muse": ["text", "image"],
    }
    assert one["full_expert"] == manifest["full_expert"] in EXPERTS
    assert one["router"]["component"] == manifest["router"]["component"]
    assert one["madds_full"] == manifest["madds_full"]
    assert (one["backend"], one["device"]) == ("onnx", "cpu")
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_probes_and_docs(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "model": "shapes",
        "version": "1",
        "models": {"shapes": "1"},
        "states": {"shapes": {"version": "1", "ready": True, "reason": ""}},
    }
    assert client.get("/docs").status_code == 200
    body = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    for content_type in ("application/json", "multipart/form-data"):
        for field in ("image", "text", "route", "threshold"):
            assert body[content_type]["schema"]["properties"][field]["description"], (content_type, field)


def test_torchscript_backend_answers_like_onnx(serve, samples, tiny_export):
    # The shipped model has ONNX files only: the tiny run's export has both.
    onnx_client = serve(store=tiny_export)
    torchscript_client = serve(store=tiny_export, backend="torchscript")
    for sample in samples[:6]:
        pair = {"image": b64(sample["png"]), "text": sample["text"]}
        a = onnx_client.post("/v1/classify", json=pair).json()
        b = torchscript_client.post("/v1/classify", json=pair).json()
        assert (a["label"], a["route"]["expert"]) == (b["label"], b["route"]["expert"])
        for label, p in a["scores"].items():
            assert b["scores"][label] == pytest.approx(p, abs=1e-4)
    assert torchscript_client.get("/v1/models/shapes").json()["backend"] == "torchscript"


def test_api_key_guards_inference_but_not_probes_or_metrics(serve, samples):
    client = serve(api_key="s3cret")
    pair = {"text": samples[0]["text"]}

    assert client.post("/v1/classify", json=pair).status_code == 401
    wrong = client.post("/v1/classify", json=pair, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/v1/classify", json=pair, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_path).status_code == 200


def test_named_keys_label_the_request_metrics_by_name_never_by_key(serve, samples, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ci: ci-s3cret\npartner: clé-🔑-partner\n", encoding="utf-8")
    client = serve(api_keys_file=keys)
    pair = {"text": samples[0]["text"]}
    assert client.post("/v1/classify", json=pair, headers={"Authorization": "Bearer ci-s3cret"}).status_code == 200
    # a key with non-ASCII characters, sent as its UTF-8 bytes
    partner = {"Authorization": b"Bearer " + "clé-🔑-partner".encode()}
    assert client.post("/v1/classify", json=pair, headers=partner).status_code == 200
    assert client.post("/v2/models/shapes/infer", json=TEXT_V2, headers=partner).status_code == 200
    for wrong in (b"Bearer " + "clé-🔑-partner".encode("utf-16"), b"Bearer \xff", b"Bearer " + b"k" * 30_000):
        assert client.post("/v1/classify", json=pair, headers={"Authorization": wrong}).status_code == 401
    assert client.post("/v1/classify", json=pair).status_code == 401
    text = client.get("/metrics").text
    samples_ = scrape(client)
    http = {"model": "shapes", "protocol": "http"}
    assert value(samples_, "dynfuse_requests_total", status="200", key="ci", **http) == 1
    assert value(samples_, "dynfuse_requests_total", status="200", key="partner", **http) == 2
    assert value(samples_, "dynfuse_requests_total", status="401", key="anonymous", **http) == 4
    for secret in ("ci-s3cret", "clé", "🔑"):  # the keys themselves never reach the metrics
        assert secret not in text
