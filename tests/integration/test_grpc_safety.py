"""Routing safety over gRPC: an answer ModelInfer sends is audited as the same answer over HTTP is (once it has
been sent, in spare capacity), so gRPC traffic counts in the audits, the guard and the drift; and an answer over
gRPC or /v2 says what /v1's says of itself (degraded, guarded, uncertain and why) in outputs of those names.

The expected outcomes come from the answers themselves (the expert that answered and who decided) and from the
same inputs forced onto the full path, as tests/integration/test_routing_safety.py does over HTTP."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import b64, make_strict, scrape

MODEL = "shapes"


def infer(client, sample, **parameters) -> dict:
    inputs = []
    for name, element in (("image", sample["png"]), ("text", sample["text"].encode())):
        tensor = triton.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([element], dtype=np.object_))
        inputs.append(tensor)
    result = client.infer(MODEL, inputs, parameters=parameters or None)
    return {name: result.as_numpy(name)[0] for name in ("label", "expert", "decided_by")}


def audits(http) -> dict[str, float]:
    totals = {"agreed": 0.0, "disagreed": 0.0, "dropped": 0.0}
    for (name, labels), v in scrape(http).items():
        if name == "dynfuse_audits_total":
            totals[dict(labels)["outcome"]] += v
    return totals


def test_every_grpc_answer_from_a_cheaper_expert_is_audited_at_rate_1(serve, samples):
    http = serve(grpc_port=0, audit_rate=1.0, guard=False, min_confidence=0.0)  # the router's picks alone
    client = triton.InferenceServerClient(f"127.0.0.1:{http.app.state.grpc.port}")
    full = http.get(f"/v1/models/{MODEL}").json()["full_expert"]
    answers = [infer(client, sample) for sample in samples[:40]]
    cheaper = [(s, a) for s, a in zip(samples[:40], answers, strict=True)
               if a["expert"].decode() != full and a["decided_by"] == b"router"]  # fmt: skip
    assert 5 <= len(cheaper) < 40, "the tiny model routes some of these to cheaper experts, not all"
    agreed = sum(infer(client, sample, route=full)["label"] == answer["label"] for sample, answer in cheaper)

    deadline = time.monotonic() + 30
    while (seen := audits(http))["agreed"] + seen["disagreed"] < len(cheaper):
        assert time.monotonic() < deadline, f"audited {seen} of {len(cheaper)}"
        time.sleep(0.02)
    assert seen == {"agreed": agreed, "disagreed": len(cheaper) - agreed, "dropped": 0}
    state = http.get(f"/v1/models/{MODEL}").json()["safety"]["audits"]
    assert (state["agreed"], state["disagreed"]) == (agreed, len(cheaper) - agreed)
    client.close()


# -- what an answer says of its own safety: the same outputs over gRPC and /v2 as /v1's fields ------------------------
SAFETY_OUTPUTS = ("degraded", "guarded", "uncertain", "uncertain_reason")


def safety_over_grpc(client, sample, **parameters) -> dict:
    inputs = []
    for name, element in (("image", sample["png"]), ("text", sample["text"].encode())):
        tensor = triton.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([element], dtype=np.object_))
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(name) for name in SAFETY_OUTPUTS]
    result = client.infer(MODEL, inputs, outputs=outputs, parameters=parameters or None)
    response = result.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("degraded", "BOOL", [1]), ("guarded", "BOOL", [1]), ("uncertain", "BOOL", [1]),
        ("uncertain_reason", "BYTES", [1]),
    ]  # fmt: skip
    values = {name: result.as_numpy(name)[0] for name in SAFETY_OUTPUTS}
    return {name: v.decode() if isinstance(v, bytes) else bool(v) for name, v in values.items()}


def safety_over_v2(http, sample, **parameters) -> dict:
    inputs = [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(sample["png"])]},
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [sample["text"]]},
    ]
    body = {"inputs": inputs, "outputs": [{"name": n} for n in SAFETY_OUTPUTS], "parameters": parameters}
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [(o["name"], o["datatype"]) for o in outputs] == list(
        zip(SAFETY_OUTPUTS, ("BOOL", "BOOL", "BOOL", "BYTES"), strict=True)
    )
    return {o["name"]: o["data"][0] for o in outputs}


def safety_over_v1(http, sample, **fields) -> dict:
    response = http.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"], **fields})
    assert response.status_code == 200, response.text
    answer = response.json()
    return {
        "degraded": answer["route"]["degraded"],
        "guarded": answer["route"]["guarded"],
        "uncertain": answer["uncertain"],
        "uncertain_reason": answer.get("uncertain_reason", ""),
    }


@pytest.mark.parametrize(
    ("thresholds", "reason"),
    [
        ({"uncertain_ood_alpha": 0.0, "uncertain_confidence": 1.0}, "low_confidence"),  # every answer below 1.0
        ({"uncertain_ood_alpha": 1.0, "uncertain_confidence": 0.0}, "out_of_distribution"),  # some inputs
    ],
)
def test_grpc_and_v2_answers_say_uncertain_and_why_as_v1_does(serve, samples, thresholds, reason):
    http = serve(grpc_port=0, audit_rate=0.0, **thresholds)
    client = triton.InferenceServerClient(f"127.0.0.1:{http.app.state.grpc.port}")
    seen = []
    for sample in samples[:16]:
        expected = safety_over_v1(http, sample)
        assert safety_over_grpc(client, sample) == expected
        assert safety_over_v2(http, sample) == expected
        seen.append(expected["uncertain_reason"])
    client.close()
    assert set(seen) <= {reason, ""}
    assert seen.count(reason) >= 4, seen


@pytest.fixture
def strict_store(store_copy):
    """The served store made strict (conftest's make_strict): any disagreement is a fall (as in
    test_routing_safety.py)."""
    [path] = list(store_copy.glob(f"{MODEL}/*/model.json"))
    path.write_text(json.dumps(make_strict(json.loads(path.read_text()))))
    return store_copy


def test_grpc_answers_that_disagree_on_audit_engage_the_guard_and_guarded_answers_say_so(serve, samples, strict_store):
    http = serve(store=strict_store, grpc_port=0, audit_rate=1.0, guard_min_audits=4, guard_window=4)
    client = triton.InferenceServerClient(f"127.0.0.1:{http.app.state.grpc.port}")
    model = http.get(f"/v1/models/{MODEL}").json()
    point, full = model["default_operating_point"], model["full_expert"]

    def guard() -> dict:
        return http.get(f"/v1/models/{MODEL}").json()["safety"]["guard"]

    def wait_for(state: str) -> None:
        deadline = time.monotonic() + 30
        while guard()["state"] != state:
            assert time.monotonic() < deadline, f"the guard is {guard()['state']}, not {state}"
            time.sleep(0.02)

    # Split the samples by what an audit of their answer finds (the router's pick, a cheaper expert, against the
    # full path forced), over gRPC; naming the operating point keeps these answers out of any guard.
    agreeing, disagreeing = [], []
    for sample in samples:
        answer = infer(client, sample, operating_point=point)
        if answer["expert"].decode() == full:
            continue
        forced = infer(client, sample, route=full)
        (agreeing if forced["label"] == answer["label"] else disagreeing).append(sample)
    assert len(agreeing) >= 4, len(agreeing)
    assert len(disagreeing) >= 4, len(disagreeing)

    for sample in agreeing[:4]:  # four agreeing audits in a row: watching, whatever the calls above did
        infer(client, sample)
    wait_for("watching")
    assert safety_over_grpc(client, agreeing[0])["guarded"] is False
    for sample in disagreeing[:4]:  # four gRPC answers that an audit finds wrong
        infer(client, sample)
    wait_for("guarding")

    assert safety_over_grpc(client, agreeing[0])["guarded"] is True
    assert safety_over_v2(http, agreeing[0])["guarded"] is True
    assert safety_over_v1(http, agreeing[0])["guarded"] is True
    # A request that names its own operating point is served as asked, over either transport.
    assert safety_over_grpc(client, agreeing[0], operating_point=point)["guarded"] is False
    assert safety_over_v2(http, agreeing[0], operating_point=point)["guarded"] is False
    client.close()


def test_a_grpc_answer_is_handed_to_the_auditor_on_the_event_loop(serve, samples, monkeypatch):
    """As each HTTP route (test_routing_safety.py): the batcher's spare lane is the loop's (an asyncio.Event and a
    deque it reads), so gRPC's done callback must run there, not in a thread of grpc's."""
    import asyncio

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
    http = serve(grpc_port=0, audit_rate=1.0, guard=False)
    client = triton.InferenceServerClient(f"127.0.0.1:{http.app.state.grpc.port}")
    infer(client, samples[0])
    deadline = time.monotonic() + 30
    while not calls:
        assert time.monotonic() < deadline, "no after_response within 30 s"
        time.sleep(0.02)
    assert calls == [(1, True)]
    client.close()
