"""Routing safety over gRPC: an answer ModelInfer sends is audited as the same answer over HTTP is (once it has
been sent, in spare capacity), so gRPC traffic counts in the audits, the guard and the drift.

The expected outcomes come from the answers themselves (the expert that answered and who decided) and from the
same inputs forced onto the full path, as tests/integration/test_routing_safety.py does over HTTP."""

from __future__ import annotations

import time

import numpy as np
import tritonclient.grpc as triton
from conftest import scrape

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
    http = serve(grpc_port=0, audit_rate=1.0, guard=False)
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
