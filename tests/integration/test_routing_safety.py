"""Is routing still safe? Shadow audits, the guard and the drift of the route mix, over HTTP on the tiny model.

The expected values come from the answers themselves: every answer says which expert answered and who decided,
and the same inputs forced onto the full path say what an audit must find.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time

import pytest
from conftest import b64, make_strict, scrape, value

MODEL = "shapes"


def classify(client, sample, **fields):
    response = client.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def audits(client) -> dict[str, float]:
    samples = scrape(client)
    totals = {"agreed": 0.0, "disagreed": 0.0, "dropped": 0.0}
    for (name, labels), v in samples.items():
        if name == "dynfuse_audits_total":
            totals[dict(labels)["outcome"]] += v
    return totals


def full_expert(client) -> str:
    return client.get(f"/v1/models/{MODEL}").json()["full_expert"]


def expected_outcomes(client, samples, answers) -> list[bool]:
    """For every answer a cheaper expert gave (decided by the router), whether the full path answers the same."""
    full = full_expert(client)
    outcomes = []
    for sample, answer in zip(samples, answers, strict=True):
        if answer["route"]["expert"] != full and answer["route"]["decided_by"] == "router":
            outcomes.append(classify(client, sample, route=full)["label"] == answer["label"])
    return outcomes


def test_every_answer_from_a_cheaper_expert_is_audited_at_rate_1_and_counted_apart(serve, samples):
    # The router's picks alone (no confidence floor): a fallback's audit compares the pick's replaced answer, which
    # expected_outcomes cannot read from the response.
    client = serve(audit_rate=1.0, guard=False, min_confidence=0.0)
    before = scrape(client)
    answers = [classify(client, sample) for sample in samples[:40]]
    expected = expected_outcomes(client, samples[:40], answers)
    assert 5 <= len(expected) < 40, "the tiny model routes some of these to cheaper experts, not all"
    agreed, disagreed = sum(expected), len(expected) - sum(expected)

    def all_audited():
        seen = audits(client)
        return seen if seen["agreed"] + seen["disagreed"] >= len(expected) else None

    seen = wait_for(all_audited, "audits")
    assert (seen["agreed"], seen["disagreed"], seen["dropped"]) == (agreed, disagreed, 0)

    # Each audit ran the full path on its request: what a request forced onto the full path costs.
    full = full_expert(client)
    full_madds = classify(client, samples[0], route=full)["compute"]["madds"]
    after = scrape(client)
    assert value(after, "dynfuse_audit_madds_total", model=MODEL) == len(expected) * full_madds
    # The requests' compute is what their answers reported, audits not included (the forced calls above count).
    reported = sum(a["compute"]["madds"] for a in answers) + (len(expected) + 1) * full_madds
    executed = value(after, "dynfuse_compute_madds_total", model=MODEL) - value(
        before, "dynfuse_compute_madds_total", model=MODEL
    )
    assert executed == reported

    state = client.get(f"/v1/models/{MODEL}").json()["safety"]
    assert state["audits"]["agreed"] == agreed
    assert state["audits"]["disagreed"] == disagreed


def test_audits_are_considered_on_the_event_loop_once_each_answer_is_sent(serve, samples, monkeypatch):
    """Every route hands its answers to the auditor on the event loop (the batcher's spare lane is the loop's: an
    asyncio.Event and a deque it reads), not in a worker thread, where no event loop runs."""
    from service.inference import InferenceService

    calls = []
    real = InferenceService.after_response

    def recorded(self, items, results):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(items), on_loop))
        real(self, items, results)

    monkeypatch.setattr(InferenceService, "after_response", recorded)
    client = serve(audit_rate=1.0, guard=False)
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}
    assert client.post("/v1/classify", json=pair).status_code == 200
    assert client.post("/v1/classify/batch", json={"inputs": [pair, pair]}).status_code == 200
    v2 = [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [pair["image"]]},
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [pair["text"]]},
    ]
    assert client.post(f"/v2/models/{MODEL}/infer", json={"inputs": v2}).status_code == 200
    wait_for(lambda: len(calls) == 3, "the three calls' after_response")
    assert calls == [(1, True), (2, True), (1, True)]


def test_no_audit_at_rate_0_and_the_guard_says_why_it_is_off(serve, samples):
    client = serve(audit_rate=0.0)
    for sample in samples[:10]:
        classify(client, sample)
    assert audits(client) == {"agreed": 0.0, "disagreed": 0.0, "dropped": 0.0}
    guard = client.get(f"/v1/models/{MODEL}").json()["safety"]["guard"]
    assert guard["state"] == "off"
    assert "AUDIT_RATE" in guard["reason"]


@pytest.fixture
def strict_store(store_copy):
    """The served store made strict (conftest's make_strict): any disagreement is a fall, and the guard has a floor."""
    [path] = list(store_copy.glob(f"{MODEL}/*/model.json"))
    path.write_text(json.dumps(make_strict(json.loads(path.read_text()))))
    return store_copy


def test_the_guard_engages_when_audits_disagree_then_releases_when_they_agree(serve, samples, strict_store):
    client = serve(store=strict_store, audit_rate=1.0, guard_min_audits=4, guard_window=4)
    model = client.get(f"/v1/models/{MODEL}").json()
    guard = model["safety"]["guard"]
    assert guard["state"] == "watching"
    assert guard["validated_agreement"] == 1.0
    safer_floor = guard["safer_min_confidence"]
    assert safer_floor is not None

    # Split the test samples by what an audit of their answer finds (the router's pick is a cheaper expert).
    full = model["full_expert"]
    agreeing, disagreeing = [], []
    for sample in samples:
        answer = classify(client, sample, operating_point=model["default_operating_point"], min_confidence=0.0)
        if answer["route"]["expert"] == full:
            continue
        forced = classify(client, sample, route=full)
        (agreeing if forced["label"] == answer["label"] else disagreeing).append(sample)
    assert len(agreeing) >= 4, len(agreeing)
    assert len(disagreeing) >= 4, len(disagreeing)
    wait_for(lambda: client.get(f"/v1/models/{MODEL}").json()["safety"]["audits"]["waiting"] == 0, "audits run")

    def guard_state():
        return client.get(f"/v1/models/{MODEL}").json()["safety"]["guard"]

    # Whatever the calls above did to the guard, four agreeing audits in a row leave it watching.
    for sample in agreeing[:4]:
        classify(client, sample)
    wait_for(lambda: guard_state()["state"] == "watching", "watching")

    for sample in disagreeing[:4]:
        classify(client, sample)
    wait_for(lambda: guard_state()["state"] == "guarding", "the guard engages")
    state = guard_state()
    assert state["active"] is True
    assert state["changes"] >= 1
    assert state["last_change"]["to"] == state["safer_policy"]

    # Under the guard: requests that ask for nothing get the safer policy and say so ...
    answer = classify(client, agreeing[0])
    assert answer["route"]["guarded"] is True
    # ... a request that names its operating point or its own floor is obeyed as asked.
    point = model["default_operating_point"]
    assert classify(client, agreeing[0], operating_point=point)["route"]["guarded"] is False
    assert classify(client, agreeing[0], min_confidence=0.0)["route"]["guarded"] is False
    metrics = scrape(client)
    assert value(metrics, "dynfuse_guard_active", model=MODEL) == 1.0
    served, safer = state["served_policy"], state["safer_policy"]  # the point with the store's floor, a higher one
    assert value(metrics, "dynfuse_guard_changes_total", model=MODEL, **{"from": served}, to=safer) >= 1

    # Agreement back: four agreeing audits (since the change) release it.
    for sample in agreeing[:4]:
        classify(client, sample)
    wait_for(lambda: guard_state()["state"] == "watching", "the guard releases")
    assert classify(client, agreeing[0])["route"]["guarded"] is False
    assert value(scrape(client), "dynfuse_guard_active", model=MODEL) == 0.0


def test_the_route_mix_drift_is_published_per_operating_point(serve, samples):
    client = serve(drift_window=20)
    answers = [classify(client, sample) for sample in samples[:20]]
    point = answers[0]["route"]["operating_point"]
    model = client.get(f"/v1/models/{MODEL}").json()
    validation = next(p for p in model["operating_points"] if p["name"] == point)["route_mix"]
    # The router's pick is its top score: the drift's window holds exactly the mix of those picks.
    experts = [e["name"] for e in model["experts"]]
    picks = [max(experts, key=lambda e: a["route"]["scores"][e]) for a in answers]
    live = {e: picks.count(e) / len(picks) for e in experts}

    def entropy(p):
        return -sum(x * math.log2(x) for x in p if x > 0)

    m = [(live[e] + validation[e]) / 2 for e in experts]
    expected = entropy(m) - (entropy([live[e] for e in experts]) + entropy([validation[e] for e in experts])) / 2
    drift = model["safety"]["drift"][point]
    assert drift["mix"] == pytest.approx(live, abs=1e-4)
    assert drift["drift"] == pytest.approx(expected, abs=1e-5)
    assert value(scrape(client), "dynfuse_route_mix_drift", model=MODEL, operating_point=point) == pytest.approx(
        expected, abs=1e-9
    )


def test_a_model_exported_without_safety_figures_still_serves_with_the_guard_off(serve, samples, store_copy):
    [path] = list(store_copy.glob(f"{MODEL}/*/model.json"))
    manifest = json.loads(path.read_text())
    ood = manifest["safety"]["ood"]["file"]
    del manifest["safety"]
    del manifest["files"][ood]
    (path.parent / ood).unlink()
    path.write_text(json.dumps(manifest))
    client = serve(store=store_copy, audit_rate=1.0)
    answer = classify(client, samples[0])
    assert answer["uncertain"] in (True, False)
    assert answer["route"]["guarded"] is False
    guard = client.get(f"/v1/models/{MODEL}").json()["safety"]["guard"]
    assert guard["state"] == "off"
    assert "no validation safety figures" in guard["reason"]


def test_a_guard_recover_margin_not_below_the_margin_stops_the_server_at_start(tmp_path):
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="DYNFUSE_GUARD_RECOVER_MARGIN"):
        Settings(store=tmp_path, guard_margin=0.05, guard_recover_margin=0.05)
    with pytest.raises(ValidationError, match="DYNFUSE_GUARD_MIN_AUDITS"):
        Settings(store=tmp_path, guard_window=10, guard_min_audits=11)
    shutil.rmtree(tmp_path)


def uncertain_counts(client) -> dict[str, float]:
    samples = scrape(client)
    return {
        reason: value(samples, "dynfuse_uncertain_requests_total", model=MODEL, reason=reason)
        for reason in ("low_confidence", "out_of_distribution")
    }


def test_every_answer_says_whether_it_is_uncertain_and_the_counts_match_the_answers(serve, samples):
    client = serve()
    answers = [classify(client, sample) for sample in samples[:30]]
    answers += [client.post("/v1/classify", json={"text": s["text"]}).json() for s in samples[30:35]]
    reasons = {"low_confidence": 0, "out_of_distribution": 0}
    for answer in answers:
        assert isinstance(answer["uncertain"], bool)
        if answer["uncertain"]:
            reasons[answer["uncertain_reason"]] += 1
        else:
            assert "uncertain_reason" not in answer
    assert uncertain_counts(client) == reasons
    # Its thresholds are the server's, shown with the model.
    shown = client.get(f"/v1/models/{MODEL}").json()["safety"]["uncertain"]
    assert shown == {"confidence_below": 0.5, "ood_alpha": 0.01, "calibrated": True}


def test_the_thresholds_of_uncertain_are_settings(serve, samples):
    """A higher alpha flags more inputs as unlike the validation data (checked first), a higher floor more answers
    as unsure; at 0 neither flags anything. (A p-value reaches 1 for the most typical inputs, and a calibrated
    probability may round to 1 for the surest answers: not every answer is flagged at 1.)"""
    every_input = serve(uncertain_ood_alpha=1.0, uncertain_confidence=0.0)
    answers = [classify(every_input, sample) for sample in samples[:20]]
    assert {a.get("uncertain_reason") for a in answers} <= {"out_of_distribution", None}
    assert sum(a["uncertain"] for a in answers) >= 10
    every_answer = serve(uncertain_ood_alpha=0.0, uncertain_confidence=1.0)
    answers = [classify(every_answer, sample) for sample in samples[:20]]
    flagged = sum(a["uncertain"] for a in answers)
    assert {a.get("uncertain_reason") for a in answers} <= {"low_confidence", None}
    assert flagged >= 15
    assert uncertain_counts(every_answer) == {"low_confidence": flagged, "out_of_distribution": 0}
    never = serve(uncertain_ood_alpha=0.0, uncertain_confidence=0.0)
    assert not any(classify(never, sample)["uncertain"] for sample in samples[:20])
