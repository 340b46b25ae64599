"""``explain`` over gRPC: the request parameter (a bool_param) gives the ``shapley`` output, the same values /v1's
``explanation.shapley`` has for the same pair; without it ``shapley`` is not sent, and asking for it is
INVALID_ARGUMENT with what to do. On the tiny run this checkout exports (the shipped model may predate attribution),
as tests/integration/test_attribution_api.py does over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import b64
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def tiny_store(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_store) -> list[dict]:
    """Test-split samples at the tiny model's image size, from a seed it was not trained on."""
    from models.data.synthetic import SynthConfig, generate

    side = json.loads(next(tiny_store.glob("shapes/*/model.json")).read_text())["preprocessing"]["image_size"]
    data = tmp_path_factory.mktemp("grpc-explain-samples") / "data"
    generate(data, SynthConfig(size=160, seed=1, image_size=side, ood_size=0), progress=False, splits=("test",))
    return [
        {**entry, "png": (data / entry["img"]).read_bytes()}
        for entry in map(json.loads, (data / "test.jsonl").read_text().splitlines())
    ]


def inputs(sample) -> list:
    tensors = []
    for name, element in (("image", sample["png"]), ("text", sample["text"].encode())):
        tensor = triton.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([element], dtype=np.object_))
        tensors.append(tensor)
    return tensors


def test_explain_over_grpc_gives_v1s_shapley_values_and_shapley_without_it_is_refused(serve, samples):
    http = serve(grpc_port=0)
    client = triton.InferenceServerClient(f"127.0.0.1:{http.app.state.grpc.port}")
    for sample in samples[:3]:
        v1 = http.post("/v1/classify", json={"image": b64(sample["png"]), "text": sample["text"], "explain": True})
        assert v1.status_code == 200, v1.text
        expected = v1.json()["explanation"]["shapley"]

        explained = client.infer("shapes", inputs(sample), parameters={"explain": True})
        names = [o.name for o in explained.get_response().outputs]
        assert "shapley" in names
        assert explained.as_numpy("shapley").shape == (1, 2)
        assert explained.as_numpy("shapley")[0].tolist() == pytest.approx(
            [expected["text"], expected["image"]], abs=1e-5
        )
        plain = client.infer("shapes", inputs(sample))
        assert [o.name for o in plain.get_response().outputs] == [n for n in names if n != "shapley"]

    with pytest.raises(InferenceServerException) as refused:
        client.infer("shapes", inputs(samples[0]), outputs=[triton.InferRequestedOutput("shapley")])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "explain: true" in refused.value.message()
    with pytest.raises(InferenceServerException) as loose:
        client.infer("shapes", inputs(samples[0]), parameters={"explain": "yes"})
    assert loose.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameter explain" in loose.value.message()
    client.close()
