"""Importance and explain on a real tiny model, through the API: one-modality experts give exactly 1, the exact
values add up (efficiency) to log-probabilities computed here on the exported components themselves, a removed
modality is the very representation the missing-modality path feeds, and compute counts what attribution ran."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from conftest import b64
from PIL import Image

from export.pipeline import DynamicPipeline
from export.store import load_model

ONE_MODALITY = {"text": {"text": 1.0, "image": 0.0}, "image_lite": {"text": 0.0, "image": 1.0},
                "image": {"text": 0.0, "image": 1.0}}  # fmt: skip
TWO_MODALITIES = ("late_fusion", "mulmix", "mi2p", "muse")


@pytest.fixture(scope="module")
def tiny_store(tiny_export):
    """The tiny run exported by this checkout's code: attribution as the code exports it now, whichever model the
    repository ships (its store/shapes/1 may predate attribution). serve, store_copy and the fixtures below take it."""
    return tiny_export


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_store) -> list[dict]:
    """Test-split samples at the tiny model's image size, from a seed it was not trained on."""
    from models.data.synthetic import SynthConfig, generate

    side = json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())["preprocessing"]["image_size"]
    data = tmp_path_factory.mktemp("attribution-samples") / "data"
    generate(data, SynthConfig(size=480, seed=1, image_size=side, ood_size=0), progress=False, splits=("test",))
    return [
        {**entry, "png": (data / entry["img"]).read_bytes()}
        for entry in map(json.loads, (data / "test.jsonl").read_text().splitlines())
    ]


@pytest.fixture
def client(serve):
    return serve()


@pytest.fixture(scope="module")
def manifest(tiny_store) -> dict:
    return json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())


@pytest.fixture(scope="module")
def version_dir(tiny_store):
    return next(tiny_store.glob("shapes/*/model.json")).parent


def session(version_dir, manifest, component: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / manifest["components"][component]["files"]["onnx"]["file"]))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classify(client, sample, **options) -> dict:
    body = {"image": b64(sample["png"]), "text": sample["text"]} | options
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("expert", sorted(ONE_MODALITY))
def test_an_expert_that_reads_one_modality_gives_it_exactly_one(client, samples, expert):
    for sample in samples[:4]:
        body = classify(client, sample, route=expert, explain=True)
        assert body["importance"] == ONE_MODALITY[expert]
        assert body["importance_method"] == "one_modality"
        assert body["explanation"]["importance"] == ONE_MODALITY[expert]
        other = "image" if ONE_MODALITY[expert]["text"] else "text"
        assert body["explanation"]["shapley"][other] == 0.0  # a modality it never reads is a dummy player
        assert body["compute"]["attribution_madds"] == 0


@pytest.mark.parametrize("expert", TWO_MODALITIES)
def test_explained_values_add_up_to_log_probabilities_computed_on_the_components(
    client, samples, manifest, version_dir, expert
):
    entry = manifest["attribution"]["experts"][expert]
    fusion = entry["components"]
    for sample in samples[:6]:
        body = classify(client, sample, route=expert, explain=True)
        explained, log_prob = body["explanation"], body["explanation"]["log_prob"]
        # v(both): the response's own probability of its label.
        assert log_prob["both"] == pytest.approx(math.log(body["scores"][body["label"]]), abs=1e-4)
        # Efficiency: the two values share out v(both) - v(neither).
        phi = explained["shapley"]
        assert phi["text"] + phi["image"] == pytest.approx(log_prob["both"] - log_prob["neither"], abs=2e-6)
        # By hand, from the four log-probabilities.
        text = 0.5 * ((log_prob["text_only"] - log_prob["neither"]) + (log_prob["both"] - log_prob["image_only"]))
        assert phi["text"] == pytest.approx(text, abs=2e-6)
        # v(neither): the fusion components on both modalities' representation (zeros), run here with ONNX Runtime.
        label = manifest["labels"].index(body["label"])
        assert log_prob["neither"] == pytest.approx(
            neither_log_probs(version_dir, manifest, fusion, entry["absent"])[label], abs=1e-4
        )
        if entry["method"] == "exact":  # the default is the exact value itself
            assert body["importance"] == pytest.approx(explained["importance"], abs=1e-6)
        assert body["importance_method"] == entry["method"]


def neither_log_probs(version_dir, manifest, fusion: list[str], absent: dict) -> np.ndarray:
    tensors = {}
    for component in fusion:
        run = session(version_dir, manifest, component)
        feed = {}
        for info in run.get_inputs():
            if info.name not in tensors:
                fill = next(f[info.name] for f in absent.values() if info.name in f)
                dtype = np.int64 if "int64" in info.type else np.float32
                feed[info.name] = np.full([1, *info.shape[1:]], fill, dtype)
            else:
                feed[info.name] = tensors[info.name]
        tensors |= dict(zip([o.name for o in run.get_outputs()], run.run(None, feed), strict=True))
    return log_softmax(tensors["logits"][0])


def test_the_text_only_value_is_the_expert_on_the_text_encoder_s_features_and_zeros_for_the_image(
    client, samples, manifest, version_dir, tiny_store
):
    """late_fusion, by hand with ONNX Runtime: the text encoder on the caption, zeros where the image features go."""
    model = load_model(tiny_store)
    for sample in samples[:4]:
        body = classify(client, sample, route="late_fusion", explain=True)
        token_ids = np.asarray([model.tokenizer.encode(sample["text"])], np.int64)
        encoder = session(version_dir, manifest, "text_encoder")
        outputs = dict(
            zip([o.name for o in encoder.get_outputs()], encoder.run(None, {"token_ids": token_ids}), strict=True)
        )
        head = session(version_dir, manifest, "fusion_head")
        width = head.get_inputs()[1].shape[1]
        logits = head.run(
            None, {"text_features": outputs["text_features"], "image_features": np.zeros((1, width), np.float32)}
        )[0]
        label = manifest["labels"].index(body["label"])
        assert body["explanation"]["log_prob"]["text_only"] == pytest.approx(log_softmax(logits[0])[label], abs=1e-4)


def test_a_removed_modality_is_what_the_missing_modality_path_feeds(tiny_store, samples, manifest, monkeypatch):
    """The tensors the pipeline builds for a request without text are the text's declared representation in
    model.json (the one Stage I showed the experts and explain substitutes), value for value."""
    from export.backends import create_backend

    pipeline = DynamicPipeline(load_model(tiny_store), create_backend("onnx", "cpu"))
    seen = {}
    made = pipeline.execution

    def recording(tensors, pixels, inputs):
        seen.update({name: value.copy() for name, value in tensors.items()})
        return made(tensors, pixels, inputs)

    monkeypatch.setattr(pipeline, "execution", recording)
    image = Image.open(io.BytesIO(samples[0]["png"])).convert("RGB")
    pipeline.predict([pipeline.prepare(None, image), pipeline.prepare(samples[1]["text"], image)])
    for expert in TWO_MODALITIES:
        text_representation = manifest["attribution"]["experts"][expert]["absent"]["text"]
        assert text_representation, expert
        for name, fill in text_representation.items():
            assert np.all(seen[name][0] == fill), (expert, name)  # row 0 has no text
            assert not np.all(seen[name][1] == fill), (expert, name)  # row 1 has: the check can fail


def test_explain_costs_what_it_ran(client, samples, manifest):
    for expert in TWO_MODALITIES:
        entry = manifest["attribution"]["experts"][expert]
        plain = classify(client, samples[3], route=expert)
        explained = classify(client, samples[3], route=expert, explain=True)
        fusion = sum(manifest["components"][c]["madds"] for c in entry["components"])
        assert entry["explain_madds"] == 2 * fusion  # two reruns: the text alone, the image alone
        if entry["method"] == "head":
            assert entry["madds"] == manifest["components"][entry["head"]]["madds"]
            extra = entry["explain_madds"]
        else:
            assert entry["madds"] == entry["explain_madds"]
            extra = 0
        assert plain["compute"]["attribution_madds"] == entry["madds"]
        assert explained["compute"]["attribution_madds"] == entry["madds"] + extra
        assert explained["compute"]["madds"] - plain["compute"]["madds"] == extra
        assert plain["importance"] == explained["importance"]  # explain adds the reference, changes nothing else


def test_explain_in_forms_batches_and_v2(client, samples):
    sample = samples[4]
    as_json = classify(client, sample, explain=True)
    as_form = client.post(
        "/v1/classify",
        files={"image": ("x.png", sample["png"], "image/png")},
        data={"text": sample["text"], "explain": "true"},
    ).json()
    batch = client.post(
        "/v1/classify/batch", json={"inputs": [{"image": b64(sample["png"]), "text": sample["text"]}], "explain": True}
    ).json()["outputs"][0]
    assert as_form["explanation"] == as_json["explanation"] == batch["explanation"]
    for loose in ("maybe", "1", "True"):  # the document says boolean: true or false, nothing looser
        refused = client.post(
            "/v1/classify", files={"image": ("x.png", sample["png"], "image/png")}, data={"explain": loose}
        )
        assert refused.status_code == 422
        assert "explain" in refused.json()["error"]["message"]

    v2 = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(sample["png"])]},
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [sample["text"]]},
        ],
        "parameters": {"explain": True},
    }
    outputs = {o["name"]: o["data"] for o in client.post("/v2/models/shapes/infer", json=v2).json()["outputs"]}
    shapley = as_json["explanation"]["shapley"]
    assert outputs["shapley"] == pytest.approx([shapley["text"], shapley["image"]], abs=1e-5)
    # JSON rounds importance to 6 decimals (half a unit: 5e-7); /v2 sends the values unrounded
    json_importance = [as_json["importance"]["text"], as_json["importance"]["image"]]
    assert outputs["importance"] == pytest.approx(json_importance, abs=6e-7)
    unexplained = client.post("/v2/models/shapes/infer", json=v2 | {"parameters": {}, "outputs": [{"name": "shapley"}]})
    assert unexplained.status_code == 400
    assert "explain" in unexplained.json()["error"]


def test_soft_fusion_s_explanation_is_of_the_mixture(client, samples):
    body = classify(client, samples[6], route="soft", explain=True)
    assert body["importance_method"] == "mixture"
    log_prob = body["explanation"]["log_prob"]
    assert log_prob["both"] == pytest.approx(math.log(body["scores"][body["label"]]), abs=1e-4)
    phi = body["explanation"]["shapley"]
    assert phi["text"] + phi["image"] == pytest.approx(log_prob["both"] - log_prob["neither"], abs=2e-6)


def test_a_model_exported_before_attribution_still_serves_and_says_so(serve, store_copy, samples):
    path = next(store_copy.glob("shapes/*/model.json"))
    manifest = json.loads(path.read_text())
    del manifest["attribution"]
    path.write_text(json.dumps(manifest))
    client = serve(store=store_copy)

    body = classify(client, samples[0], route="late_fusion")
    assert body["importance_method"] == "unavailable"
    assert body["importance"] == body["route"]["modality_weights"]  # what importance was, said to be that
    assert body["compute"]["attribution_madds"] == 0
    assert classify(client, samples[0], route="text")["importance"] == {"text": 1.0, "image": 0.0}
    # a soft mixture reports the modality weights too, rather than a blend of attributions and router weights
    soft = classify(client, samples[0], route="soft")
    assert (soft["importance_method"], soft["importance"]) == ("unavailable", soft["route"]["modality_weights"])
    # explain is refused for every route, one-modality experts' too (their exact values need v(neither), which such
    # a model lacks): a 422 that says why, never a failed batch
    pair = {"image": b64(samples[0]["png"]), "text": samples[0]["text"], "explain": True}
    for body in (
        pair,
        pair | {"route": "text"},
        pair | {"route": "image"},
        {"text": samples[0]["text"], "explain": True},
    ):
        refused = client.post("/v1/classify", json=body)
        assert refused.status_code == 422, (body.get("route"), refused.text)
        assert "exported before attribution" in refused.json()["error"]["message"]
    assert client.get("/readyz").status_code == 200


def test_each_expert_s_own_deployment_computes_what_the_single_process_does(tiny_store, samples):
    """service/ray/'s two halves without Ray: the ingress's RemoteExecution sends each expert's sub-batch, with
    what its rows ask for attribution, to an ExpertWorker (here called in process through a stand-in handle),
    and the answers, importance and explanations are the single-process pipeline's."""
    from export.backends import create_backend
    from service.ray.experts import ExpertWorker, RemoteExpertsPipeline

    model = load_model(tiny_store)
    backend = create_backend("onnx", "cpu")

    class Call:
        def __init__(self, value):
            self.value = value

        def result(self, timeout_s):
            return self.value

    class Handle:
        def __init__(self, worker):
            self.worker = worker
            self.run = self
            self.describe = self

        def remote(self, *args):
            if not args:  # describe
                return Call({"model": model.name, "version": model.version, "expert": self.worker.expert})
            return Call(self.worker.run(args[0]))

    workers = {e: ExpertWorker(model, backend, e) for e in model.expert_names}
    for worker in workers.values():
        worker.warmup((1, 3))  # every expert, the one-modality ones included, warms what attribution asks
    remote = RemoteExpertsPipeline(model, backend, {e: Handle(w) for e, w in workers.items()}, timeout_s=30)
    local = DynamicPipeline(model, backend)
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples[:8]]
    for route in ("auto", "soft", "mi2p", "late_fusion"):
        inputs = [local.prepare(s["text"], image, route=route, explain=k % 2 == 0)
                  for k, (s, image) in enumerate(zip(samples[:8], images, strict=True))]  # fmt: skip
        for mine, theirs in zip(remote.predict(inputs)[0], local.predict(inputs)[0], strict=True):
            assert (mine.label, mine.expert, mine.madds, mine.importance_method) == (
                theirs.label,
                theirs.expert,
                theirs.madds,
                theirs.importance_method,
            )
            np.testing.assert_allclose(mine.importance, theirs.importance, atol=1e-5)
            # What "uncertain" is decided from: the calibrated top probability, and the out-of-distribution
            # p-value, which takes the image encoder's map from the expert deployment that ran it.
            assert mine.confidence == pytest.approx(theirs.confidence, abs=1e-5)
            assert mine.ood_pvalue == pytest.approx(theirs.ood_pvalue, abs=1e-9), (route, mine.expert)
            assert (mine.explanation is None) == (theirs.explanation is None)
            if theirs.explanation is not None:
                assert mine.explanation["shapley"] == pytest.approx(theirs.explanation["shapley"], abs=1e-5)
