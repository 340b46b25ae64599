"""gRPC requests go through HTTP's admission: one capacity for both transports, the sooner of the client's deadline
and the server's, readiness, and the request metrics with ``protocol="grpc"``. The real tritonclient.grpc, and
tritonclient's own stub where a test reads trailing metadata."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import scrape, value, wait_ready
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.config import Settings
from service.main import create_app

GRPC = {"model": "shapes", "protocol": "grpc", "key": "anonymous"}  # the labels of a request without a key
HTTP = {**GRPC, "protocol": "http"}


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


def held_pipeline(app) -> threading.Event:
    """Every batch waits until the returned event is set."""
    gate = threading.Event()
    pipeline = app.state.service.pipeline
    real = pipeline.predict

    def held(items):
        gate.wait(timeout=60)
        return real(items)

    pipeline.predict = held
    return gate


@pytest.fixture
def grpc_serve(serve):
    clients = []

    def start(**settings):
        http = serve(grpc_port=0, **settings)
        url = f"127.0.0.1:{http.app.state.grpc.port}"
        clients.append(triton.InferenceServerClient(url))
        return http, clients[-1], url

    yield start
    for client in clients:
        client.close()


def text_input(text: str) -> list[triton.InferInput]:
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return [tensor]


def raw_infer(url: str, text: str, timeout: float = 30):
    """ModelInfer through tritonclient's stub: (response, None) or (None, the grpc.RpcError)."""
    request = service_pb2.ModelInferRequest(model_name="shapes")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(text.encode()).to_bytes(4, "little") + text.encode())
    with grpc.insecure_channel(url) as channel:
        try:
            return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout), None
        except grpc.RpcError as error:
            return None, error


def grpc_count(http, status: str) -> float:
    return value(scrape(http), "dynfuse_requests_total", status=status, **GRPC)


def test_grpc_and_http_requests_share_one_capacity(grpc_serve, samples):
    http, client, url = grpc_serve(max_inflight=2)
    gate = held_pipeline(http.app)
    answers = []
    client.async_infer("shapes", text_input(samples[0]["text"]), callback=lambda result, error: answers.append(error))
    held_http = threading.Thread(
        target=lambda: answers.append(http.post("/v1/classify", json={"text": samples[1]["text"]}).status_code)
    )
    held_http.start()
    wait_until(lambda: http.app.front_door.admitted == 2, "one gRPC and one HTTP request admitted")

    _, refused = raw_infer(url, samples[2]["text"])
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity (2 requests in flight)" in refused.details()
    assert dict(refused.trailing_metadata())["retry-after"] == "1"
    assert http.post("/v1/classify", json={"text": samples[2]["text"]}).status_code == 503

    gate.set()
    held_http.join(timeout=60)
    wait_until(lambda: len(answers) == 2, "both held requests answered")
    assert sorted(answers, key=str) == [200, None]  # the HTTP 200, and the gRPC call without error
    wait_until(lambda: grpc_count(http, "200") == 1, "the gRPC answer counted")
    metrics = scrape(http)
    assert value(metrics, "dynfuse_requests_total", status="503", **GRPC) == 1
    assert value(metrics, "dynfuse_requests_total", status="503", **HTTP) == 1
    assert value(metrics, "dynfuse_rejected_requests_total", model="shapes", reason="over_capacity") == 2
    assert value(metrics, "dynfuse_request_duration_seconds_count", model="shapes", protocol="grpc") == 2
    assert value(metrics, "dynfuse_inflight_requests", model="shapes") == 0


def test_the_clients_deadline_is_honoured_and_counted(grpc_serve, samples):
    http, client, _ = grpc_serve()
    gate = held_pipeline(http.app)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as late:
        client.infer("shapes", text_input(samples[0]["text"]), client_timeout=0.5)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 5
    wait_until(lambda: grpc_count(http, "504") == 1, "the late call counted 504")
    gate.set()
    assert value(scrape(http), "dynfuse_rejected_requests_total", model="shapes", reason="deadline") == 1
    wait_until(lambda: http.app.front_door.admitted == 0, "its place given back")
    # The server keeps serving: the abandoned item was skipped, not run into the next answer.
    assert client.infer("shapes", text_input(samples[1]["text"])).as_numpy("label").shape == (1,)


def test_the_servers_deadline_answers_deadline_exceeded(grpc_serve, samples):
    http, client, _ = grpc_serve(request_timeout_s=1.0)
    gate = held_pipeline(http.app)
    try:
        with pytest.raises(InferenceServerException) as late:
            client.infer("shapes", text_input(samples[0]["text"]))  # no deadline of its own
    finally:
        gate.set()
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "request deadline of 1 s" in late.value.message()
    wait_until(lambda: grpc_count(http, "504") == 1, "the late call counted 504")


def test_a_cancelled_call_gives_its_place_back_and_counts_as_499(grpc_serve, samples):
    http, client, _ = grpc_serve()
    gate = held_pipeline(http.app)
    errors = []
    call = client.async_infer("shapes", text_input(samples[0]["text"]), callback=lambda r, e: errors.append(e))
    wait_until(lambda: http.app.front_door.admitted == 1, "the call admitted")
    call.cancel()
    wait_until(lambda: grpc_count(http, "499") == 1, "the cancelled call counted 499")
    gate.set()
    assert http.app.front_door.admitted == 0
    assert value(scrape(http), "dynfuse_rejected_requests_total", model="shapes", reason="client_disconnect") == 1


def test_while_the_model_loads_readiness_is_false_and_infer_unavailable(tiny_store, held_model_load, samples):
    app = create_app(Settings(store=tiny_store, grpc_port=0))
    with TestClient(app) as http:
        url = f"127.0.0.1:{app.state.grpc.port}"
        client = triton.InferenceServerClient(url)
        try:
            assert client.is_server_live()
            assert not client.is_server_ready()
            assert not client.is_model_ready("shapes")
            _, refused = raw_infer(url, samples[0]["text"])
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in refused.details()
            assert dict(refused.trailing_metadata())["retry-after"] == "1"
            with pytest.raises(InferenceServerException) as metadata:
                client.get_model_metadata("shapes")
            assert metadata.value.status() == "StatusCode.UNAVAILABLE"
            held_model_load.set()
            wait_ready(http)
            assert client.is_server_ready()
            assert client.is_model_ready("shapes")
            assert client.infer("shapes", text_input(samples[0]["text"])).as_numpy("label").shape == (1,)
            assert grpc_count(http, "503") == 1
        finally:
            client.close()
