"""Examples shipped with the model: written by the export, verified by the store, listed and served by the API."""

from __future__ import annotations

import hashlib
import json

import pytest

from export.store import IntegrityError, load_model


def test_the_export_ships_examples_of_every_kind_listed_with_their_hashes(tiny_export, tiny_data):
    test_split = _split(tiny_data)
    version_dir = next(tiny_export.glob("shapes/*"))
    examples = json.loads((version_dir / "model.json").read_text())["examples"]

    assert {e["kind"] for e in examples} == {s["kind"] for s in test_split.values()}
    for example in examples:
        sample = test_split[example["id"]]
        assert (example["text"], example["label"], example["kind"]) == (sample["text"], sample["label"], sample["kind"])
        shipped = (version_dir / example["file"]).read_bytes()
        assert shipped == (tiny_data / sample["img"]).read_bytes()
        assert example["sha256"] == hashlib.sha256(shipped).hexdigest()


def _split(data_dir) -> dict[str, dict]:
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines() if line]
    return {row["id"]: row for row in rows}


def test_a_changed_example_is_refused_at_load_naming_the_file(store_copy, manifest):
    example = manifest["examples"][0]
    path = next(store_copy.glob("shapes/*")) / example["file"]
    path.write_bytes(path.read_bytes() + b"\0")

    with pytest.raises(IntegrityError, match=example["file"].split("/")[-1]):
        load_model(store_copy)


def test_the_model_lists_its_examples_and_serves_their_images(serve, tiny_store, manifest):
    client = serve()
    listed = client.get("/v1/models/shapes").json()["examples"]

    assert [e["id"] for e in listed] == [e["id"] for e in manifest["examples"]]
    version_dir = next(tiny_store.glob("shapes/*"))
    for shown, stored in zip(listed, manifest["examples"], strict=True):
        assert shown == {
            "id": stored["id"],
            "kind": stored["kind"],
            "text": stored["text"],
            "label": stored["label"],
            "image_url": f"/v1/models/shapes/examples/{stored['id']}",
        }
        image = client.get(shown["image_url"])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content == (version_dir / stored["file"]).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/shapes/examples/nope",
        "/v1/models/shapes/examples/..%2Fmodel.json",
        "/v1/models/shapes/examples/../model.json",
        "/v1/models/shapes/examples/%2E%2E/%2E%2E/model.json",
        "/v1/models/other/examples/000000",
    ],
)
def test_unknown_examples_are_404_and_no_id_reaches_another_file(serve, path):
    response = serve().get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_example_images_need_the_api_key_like_the_rest_of_v1(serve, manifest):
    client = serve(api_key="s3cret")
    url = f"/v1/models/shapes/examples/{manifest['examples'][0]['id']}"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
