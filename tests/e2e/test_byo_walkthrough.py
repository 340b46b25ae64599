"""docs/own-experts.md ("Add routing to your models"), run as a user runs it: its commands in subprocesses.

Synthetic data -> two Hugging Face models saved with save_pretrained (examples/hf_experts/make_models.py) ->
``dynfuse train-router`` over two experts of examples/hf_experts/experts.py -> ``dynfuse export`` -> ``dynfuse
serve`` -> classify over HTTP. Sizes are the smallest that still train: the walkthrough is what is under test.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import launch_server, scrape, stop_servers, value

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXPERTS = ("text=examples.hf_experts.experts:text", "image=examples.hf_experts.experts:image")


def dynfuse(*args: str, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"dynfuse {args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    work = tmp_path_factory.mktemp("byo")
    env = {**os.environ, "DYNFUSE_EXAMPLE_MODELS": str(work / "models"), "OMP_NUM_THREADS": "1"}
    data = work / "data"
    dynfuse("data", "synth", "--out", str(data), "--size", "400", "--image-size", "32", "--ood-size", "0", "--quiet",
            env=env)  # fmt: skip
    subprocess.run(
        [sys.executable, "examples/hf_experts/make_models.py", "--data", str(data), "--out", str(work / "models"),
         "--epochs", "3"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    expert_options = [option for expert in EXPERTS for option in ("--expert", expert)]
    dynfuse("train-router", *expert_options, "--data", str(data), "--out", str(work / "run"), "--preset", "tiny",
            "--lambdas", "0,1", "--epochs", "3", "--quiet", env=env)  # fmt: skip
    dynfuse("export", str(work / "run"), "--store", str(work / "store"), "--name", "mine", "--quiet", env=env)
    return {"store": work / "store", "data": data, "env": env}


def test_the_walkthrough_serves_the_users_experts_with_a_trained_router(walkthrough):
    manifest = json.loads((walkthrough["store"] / "mine" / "1" / "model.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["text", "image"]
    assert {c for e in manifest["experts"] for c in e["components"]} == {"text.classifier", "image.classifier"}
    # Each of the user's components passed its parity check in both formats, and the whole exported pipeline
    # agrees with eager PyTorch on the held-out split.
    for name in ("text.classifier", "image.classifier"):
        assert set(manifest["parity"]["components"][name]) == {"onnx", "torchscript"}
        assert max(manifest["parity"]["components"][name].values()) <= manifest["parity"]["tolerance"]
    assert manifest["parity"]["pipeline"]["label_agreement"] >= 0.99
    assert {spec["kind"] for spec in manifest["preprocessing"]["specs"].values()} == {"hf", "image"}

    started = []
    try:
        _, base = launch_server(walkthrough["store"], started)
        sample = json.loads((walkthrough["data"] / "test.jsonl").read_text().splitlines()[0])
        image = base64.b64encode((walkthrough["data"] / sample["img"]).read_bytes()).decode()
        with httpx.Client(base_url=base, timeout=30) as client:
            auto = client.post("/v1/classify", json={"image": image, "text": sample["text"]}).json()
            assert auto["model"] == "mine"
            assert auto["label"] in manifest["labels"]
            assert auto["route"]["expert"] in ("text", "image")
            assert auto["route"]["decided_by"] == "router"
            assert auto["compute"]["madds_full"] == manifest["madds_full"]

            forced = {
                route: client.post("/v1/classify", json={"image": image, "text": sample["text"], "route": route}).json()
                for route in ("text", "image")
            }
            for route, body in forced.items():
                assert body["route"] == body["route"] | {"expert": route, "decided_by": "request"}
            # A request pays for the expert it ran: the text model and the ViT have their own measured costs.
            assert forced["text"]["compute"]["madds"] != forced["image"]["compute"]["madds"]
            text_only = client.post("/v1/classify", json={"text": sample["text"]}).json()
            assert (text_only["route"]["expert"], text_only["route"]["decided_by"]) == ("text", "missing_modality")

            samples = scrape(client)
            assert value(samples, "dynfuse_route_decisions_total", model="mine", expert="text",
                         decided_by="missing_modality") == 1  # fmt: skip
            labels = {"model": "mine", "protocol": "http", "key": "anonymous"}
            assert value(samples, "dynfuse_requests_total", status="200", **labels) == 4
    finally:
        stop_servers(started)


def test_each_preprocessing_spec_runs_once_per_batch_for_the_rows_routed_to_it(walkthrough, monkeypatch):
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from models.data.manifest import load_image_rgb, read_split

    model = load_model(walkthrough["store"], "mine")
    pipeline = DynamicPipeline(model, create_backend("onnx", "cpu"))
    specs = model.specs
    applied = []  # (spec kind, rows) of every call, the real spec doing the work
    real_apply = type(specs).apply

    def counting_apply(self, key, texts, pixels):
        out = real_apply(self, key, texts, pixels)
        applied.append((self.specs[key].kind, len(next(iter(out.values())))))
        return out

    monkeypatch.setattr(type(specs), "apply", counting_apply)
    samples = read_split(walkthrough["data"], "test")[:6]
    routes = ["text", "image", "text", "image", "image", "text"]
    inputs = [pipeline.prepare(s.text, load_image_rgb(s), route=r) for s, r in zip(samples, routes, strict=True)]
    outputs, _ = pipeline.predict(inputs)
    assert [o.expert for o in outputs] == routes
    # One tokenizer call for the three text rows, one resize-and-normalize for the three image rows.
    assert sorted(applied) == [("hf", 3), ("image", 3)]

    applied.clear()
    pipeline.predict([pipeline.prepare(s.text, load_image_rgb(s), route="text") for s in samples])
    assert applied == [("hf", 6)]  # no request ran the ViT: its spec never ran

    # Gathering the rows of a spec made for several requests hands each request its own tensors: every request
    # gets what it gets when it is alone in its batch.
    for x, out in zip(inputs, outputs, strict=True):
        assert np.allclose(pipeline.predict([x])[0][0].probabilities, out.probabilities, atol=1e-5)
