"""The model repository over gRPC: tritonclient.grpc's get_model_repository_index, load_model and unload_model on a
served app, the version parameter, the refusals HTTP gives, model control and its keys as over HTTP
(tests/integration/test_repository.py), and KServe's own messages for the two calls it declares (its field 1 is the
model name; its answers carry the name and a flag, which Triton's messages do not declare)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

KEY = "repo-key"
ADMIN = "repo-admin-key"


def publish(store: Path, version: str) -> Path:
    """A new version of the model appears in the store (a copy of version 1), as an export beside the server."""
    target = store / "shapes" / version
    shutil.copytree(store / "shapes" / "1", target)
    manifest = json.loads((target / "model.json").read_text())
    manifest["version"] = version
    (target / "model.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture
def grpc_store(serve, store_copy):
    clients = []

    def start(**settings):
        # Model control on (it is off by default: test_load_and_unload_are_refused_by_default); on loopback it
        # needs no admin key unless a test sets one.
        http = serve(store=store_copy, grpc_port=0, **{"model_control": "explicit", **settings})
        url = f"127.0.0.1:{http.app.state.grpc.port}"
        clients.append(triton.InferenceServerClient(url))
        return http, clients[-1], url

    yield start, store_copy
    for client in clients:
        client.close()


def text_infer(client, text: str, **kwargs):
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return client.infer("shapes", [tensor], **kwargs)


def raw_call(url: str, method: str, body: bytes) -> bytes:
    """The call with a body of protobuf bytes, answered bytes: what any client's messages put on the wire."""
    with grpc.insecure_channel(url) as channel:
        return channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(body, timeout=60)


def test_index_load_a_new_version_roll_back_unload_and_load_again(grpc_store, samples):
    start, store = grpc_store
    http, client, url = start()
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "shapes", "version": "1", "state": "READY"}]  # an empty reason is left out in JSON

    publish(store, "2")
    client.load_model("shapes")  # the highest in the store
    assert client.get_model_metadata("shapes").versions == ["2"]
    assert text_infer(client, samples[0]["text"]).get_response().model_version == "2"
    assert http.get("/v2/models/shapes").json()["versions"] == ["2"]  # one repository for both transports

    rollback = service_pb2.RepositoryModelLoadRequest(model_name="shapes")
    rollback.parameters["version"].string_param = "1"
    with grpc.insecure_channel(url) as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(rollback, timeout=60)
    assert client.get_model_metadata("shapes").versions == ["1"]
    by_number = service_pb2.RepositoryModelLoadRequest(model_name="shapes")
    by_number.parameters["version"].int64_param = 2
    with grpc.insecure_channel(url) as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(by_number, timeout=60)
    assert client.get_model_metadata("shapes").versions == ["2"]

    client.unload_model("shapes", unload_dependents=True)
    assert not client.is_model_ready("shapes")
    [entry] = client.get_model_repository_index(as_json=True)["models"]
    assert (entry["name"], entry["state"], entry["reason"]) == ("shapes", "UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException) as gone:
        text_infer(client, samples[0]["text"])
    assert gone.value.status() == "StatusCode.UNAVAILABLE"  # nothing is served: as HTTP's 503
    client.load_model("shapes")
    assert client.is_model_ready("shapes")
    assert text_infer(client, samples[0]["text"]).as_numpy("label").shape == (1,)


def test_ready_only_index(grpc_store):
    start, store = grpc_store
    _, client, url = start()
    shutil.copytree(store / "shapes", store / "other")  # a second model of the store, not served
    for version_dir in (store / "other").iterdir():
        manifest = json.loads((version_dir / "model.json").read_text())
        manifest["name"] = "other"
        (version_dir / "model.json").write_text(json.dumps(manifest))
    everything = service_pb2.RepositoryIndexResponse.FromString(
        raw_call(url, "RepositoryIndex", service_pb2.RepositoryIndexRequest().SerializeToString())
    )
    assert [(m.name, m.state) for m in everything.models] == [("other", "UNAVAILABLE"), ("shapes", "READY")]
    ready = service_pb2.RepositoryIndexResponse.FromString(
        raw_call(url, "RepositoryIndex", service_pb2.RepositoryIndexRequest(ready=True).SerializeToString())
    )
    assert [(m.name, m.state) for m in ready.models] == [("shapes", "READY")]


def kserve_request(name: str) -> bytes:
    """KServe's RepositoryModelLoadRequest / RepositoryModelUnloadRequest: ``string model_name = 1``."""
    return b"\x0a" + bytes([len(name)]) + name.encode()


def test_kserves_messages_load_and_unload_and_get_kserves_answer(grpc_store):
    start, store = grpc_store
    _, client, url = start()
    publish(store, "2")
    answer = raw_call(url, "RepositoryModelLoad", kserve_request("shapes"))
    assert answer == b"\x0a\x06shapes\x10\x01"  # KServe's model_name = 1, isLoaded = 2: true
    assert client.get_model_metadata("shapes").versions == ["2"]
    # Triton's client reads the same answer as its own (empty) message.
    assert service_pb2.RepositoryModelLoadResponse.FromString(answer).ByteSize() == len(answer)
    answer = raw_call(url, "RepositoryModelUnload", kserve_request("shapes"))
    assert answer == b"\x0a\x06shapes\x10\x01"  # isUnloaded: true
    assert not client.is_model_ready("shapes")


@pytest.mark.parametrize(
    ("call", "code", "fragment"),
    [
        (lambda c, s: c.load_model("nope"), "NOT_FOUND", "nope"),
        (lambda c, s: c.load_model("shapes", config='{"max_batch_size": 4}'), "INVALID_ARGUMENT", "not supported"),
        (lambda c, s: c.load_model("shapes", files={"file:1/model.onnx": b"x"}), "INVALID_ARGUMENT", "not supported"),
        (lambda c, s: c.load_model(""), "INVALID_ARGUMENT", "model_name is empty"),
        (lambda c, s: c.unload_model("nope"), "NOT_FOUND", "nope"),
    ],
    ids=["unknown model", "config override", "file override", "no name", "unload unknown"],
)
def test_what_the_repository_cannot_do_is_refused_with_a_status_code(grpc_store, call, code, fragment):
    start, store = grpc_store
    _, client, _ = start()
    with pytest.raises(InferenceServerException) as refused:
        call(client, store)
    assert refused.value.status() == f"StatusCode.{code}", refused.value.message()
    assert fragment in refused.value.message()
    assert client.is_model_ready("shapes")  # what was served keeps serving


def test_a_version_that_does_not_verify_is_failed_precondition_and_the_old_one_serves(grpc_store, samples):
    start, store = grpc_store
    _, client, url = start()
    broken = publish(store, "2")
    onnx_file = next(broken.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("shapes")
    assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "version 2 refused" in refused.value.message()
    assert "version 1 keeps serving" in refused.value.message()
    assert text_infer(client, samples[0]["text"]).get_response().model_version == "1"
    named = service_pb2.RepositoryModelLoadRequest(model_name="shapes", repository_name="models")
    with grpc.insecure_channel(url) as channel, pytest.raises(grpc.RpcError) as other_repository:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(named, timeout=60)
    assert other_repository.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one model store" in other_repository.value.details()


def test_load_and_unload_are_refused_by_default_and_when_the_store_is_polled(grpc_store, samples):
    start, _ = grpc_store
    for mode, words in (("none", "DYNFUSE_MODEL_CONTROL=none"), ("poll", "DYNFUSE_MODEL_CONTROL=poll")):
        _, client, _ = start(model_control=mode, admin_key=ADMIN)
        admin = {"authorization": f"Bearer {ADMIN}"}
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as refused:
                call("shapes", headers=admin)
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED", refused.value.message()
            assert words in refused.value.message()
        assert [m.state for m in client.get_model_repository_index().models] == ["READY"]  # readable in any mode
        assert client.is_model_ready("shapes")
        assert text_infer(client, samples[0]["text"]).get_response().model_version == "1"


def test_control_needs_the_admin_key_and_the_index_any_valid_key(grpc_store, tmp_path):
    start, store = grpc_store
    keys = tmp_path / "keys"
    keys.write_text("ci: ci-key\n")
    _, client, _ = start(api_key=KEY, api_keys_file=keys, admin_key=ADMIN)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {KEY}"},
                    {"authorization": "Bearer ci-key"}):  # fmt: skip
        for call in (
            lambda h: client.load_model("shapes", headers=h),
            lambda h: client.unload_model("shapes", headers=h),
        ):
            with pytest.raises(InferenceServerException) as refused:
                call(headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED", refused.value.message()
            assert "admin key" in refused.value.message()
    for headers in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_repository_index(headers=headers)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    for key in (KEY, "ci-key", ADMIN):
        assert [
            m.name for m in client.get_model_repository_index(headers={"authorization": f"Bearer {key}"}).models
        ] == ["shapes"]
    admin = {"authorization": f"Bearer {ADMIN}"}
    with pytest.raises(InferenceServerException) as refused:  # the admin key is not an inference key
        text_infer(client, "a red circle", headers=admin)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    publish(store, "2")
    client.load_model("shapes", headers=admin)
    assert client.get_model_metadata("shapes", headers={"authorization": "Bearer ci-key"}).versions == ["2"]
    client.unload_model("shapes", headers=admin)
    assert not client.is_model_ready("shapes")
