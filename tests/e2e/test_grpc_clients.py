"""A real ``dynfuse serve --grpc-port`` on loopback against the real clients of the protocol: ``tritonclient.grpc``
(sync and asyncio) in this process, KServe's ``InferenceGRPCClient`` in one of its own
(tests/e2e/kserve_grpc_client.py says why). Every client must get, for the same inputs, the outputs
``tritonclient.http`` gets from /v2 over HTTP; then keys, errors, shutdown on SIGTERM, several workers, a port in
use and the Ray engine's refusal."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
from conftest import free_port, worker_pids
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.server import available_cores

pytestmark = pytest.mark.e2e

KSERVE_CLIENT = Path(__file__).with_name("kserve_grpc_client.py")
OUTPUTS = [
    "label", "probabilities", "expert", "decided_by", "importance", "modality_weights", "madds", "saved_ratio",
    "operating_point", "degraded", "guarded", "uncertain", "uncertain_reason",
]  # fmt: skip
KEY = "grpc-e2e-key"
ADMIN = "grpc-e2e-admin-key"
GRPC_LABELS = (("key", "anonymous"), ("model", "shapes"), ("protocol", "grpc"), ("status", "200"))
GRPC_200 = ("dynfuse_requests_total", GRPC_LABELS)  # gRPC calls answered, without a key


def start(server_process, **env) -> tuple:
    """(process, HTTP base URL, gRPC host:port)."""
    port = free_port()
    process, base = server_process(grpc_port=port, **env)
    return process, base, f"127.0.0.1:{port}"


def as_lists(values: dict) -> dict:
    """Outputs compared across clients: BYTES as lists of str, numbers as nested lists of the exact values."""
    out = {}
    for name, array in values.items():
        if array.dtype == np.object_:
            out[name] = [e.decode() if isinstance(e, bytes) else e for e in array.tolist()]
        else:
            out[name] = array.tolist()
    return out


def http_outputs(base: str, images: list[bytes], texts: list[str], parameters: dict) -> dict:
    client = triton_http.InferenceServerClient(url=base.removeprefix("http://"), network_timeout=60)
    inputs = []
    for name, elements in (("image", images), ("text", [t.encode() for t in texts])):
        tensor = triton_http.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=True)
        inputs.append(tensor)
    result = client.infer("shapes", inputs, parameters=parameters or None)
    return as_lists({name: result.as_numpy(name) for name in OUTPUTS})


def grpc_inputs(images: list[bytes], texts: list[str]) -> list:
    inputs = []
    for name, elements in (("image", images), ("text", [t.encode() for t in texts])):
        tensor = triton_grpc.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
        inputs.append(tensor)
    return inputs


def kserve(url: str, calls: list[dict]) -> list[dict]:
    spec = json.dumps({"url": url, "calls": calls})
    done = subprocess.run(
        [sys.executable, str(KSERVE_CLIENT)], input=spec, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def kserve_infer(images, texts, parameters=None, encoding="raw", **fields) -> dict:
    b64 = [base64.b64encode(i).decode() for i in images] if images is not None else None
    return {"call": "infer", "images": b64, "texts": texts, "parameters": parameters or {}, "encoding": encoding,
            **fields}  # fmt: skip


def test_tritonclient_and_kserve_over_grpc_answer_as_tritonclient_over_http(server_process, samples):
    _, base, url = start(server_process)
    rows = samples[:6]
    images, texts = [s["png"] for s in rows], [s["text"] for s in rows]
    client = triton_grpc.InferenceServerClient(url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("shapes")
    cases = [{}, {"route": "soft"}, {"route": "image"}, {"threshold": 0.95}, {"operating_point": "lambda_0"}]
    calls = [{"call": "health", "model": "shapes"}]
    for parameters in cases:
        calls += [kserve_infer(images, texts, parameters, "raw", id="k-raw"),
                  kserve_infer(images, texts, parameters, "contents", id="k-contents")]  # fmt: skip
    answers = kserve(url, calls)
    assert answers[0] == {"live": True, "ready": True, "model_ready": True}

    for index, parameters in enumerate(cases):
        expected = http_outputs(base, images, texts, parameters)
        result = client.infer("shapes", grpc_inputs(images, texts), parameters=parameters or None)
        assert as_lists({name: result.as_numpy(name) for name in OUTPUTS}) == expected, parameters
        for answer, request_id in zip(answers[1 + 2 * index : 3 + 2 * index], ("k-raw", "k-contents"), strict=True):
            assert "error" not in answer, answer
            assert (answer["id"], answer["model_name"], answer["model_version"]) == (request_id, "shapes", "1")
            assert answer["datatypes"]["madds"] == "INT64"
            assert answer["outputs"] == expected, (parameters, request_id)
    client.close()


def test_the_asyncio_client_and_kserve_get_the_keys_and_errors_of_http(server_process, samples):
    _, base, url = start(server_process, api_key=KEY)
    text = [samples[0]["text"]]

    async def asyncio_client():
        async with triton_grpc_aio.InferenceServerClient(url) as client:
            inputs = grpc_inputs([samples[0]["png"]], text)
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("shapes", inputs)
            result = await client.infer("shapes", inputs, headers={"authorization": f"Bearer {KEY}"})
            return refused.value, result.as_numpy("label").tolist()

    refused, labels = asyncio.run(asyncio_client())
    assert refused.status() == "StatusCode.UNAUTHENTICATED"
    assert len(labels) == 1

    good = {"authorization": f"Bearer {KEY}"}
    answers = kserve(url, [
        kserve_infer(None, text),
        kserve_infer(None, text, headers={"authorization": "Bearer nope"}),
        kserve_infer(None, text, headers=good),
        kserve_infer(None, text, {"route": "warp"}, headers=good),
        kserve_infer(None, text, model="nope", headers=good),
        kserve_infer(None, ["x" * 5000], headers=good),
        kserve_infer([b"not an image"], None, headers=good),
    ])  # fmt: skip
    codes = [a["error"]["code"] if "error" in a else "OK" for a in answers]
    assert codes == [
        "UNAUTHENTICATED", "UNAUTHENTICATED", "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED",
        "INVALID_ARGUMENT",
    ]  # fmt: skip
    assert "Bearer <key>" in answers[0]["error"]["details"]
    assert "parameter route: 'warp'" in answers[3]["error"]["details"]
    http_text = httpx.post(f"{base}/v1/classify", json={"text": text[0]}, headers=good, timeout=30).json()
    assert answers[2]["outputs"]["label"] == [http_text["label"]]
    assert answers[2]["outputs"]["expert"] == [http_text["route"]["expert"]]
    assert answers[2]["outputs"]["madds"] == [http_text["compute"]["madds"]]


def publish(store: Path, version: str) -> None:
    """What an export running beside the server does: a newer version (a copy of version 1) appears in the store."""
    newer = store / "shapes" / version
    shutil.copytree(store / "shapes" / "1", newer)
    manifest = json.loads((newer / "model.json").read_text())
    manifest["version"] = version
    (newer / "model.json").write_text(json.dumps(manifest))


def test_kserves_own_messages_load_and_unload_a_model(server_process, store_copy):
    _, _, url = start(server_process, store=store_copy, model_control="explicit", admin_key=ADMIN)
    publish(store_copy, "2")
    client = triton_grpc.InferenceServerClient(url)
    assert client.get_model_metadata("shapes").versions == ["1"]  # served until a load asks for another
    admin = {"authorization": f"Bearer {ADMIN}"}
    refused = kserve(url, [{"call": "load", "model": "shapes"}, {"call": "unload", "model": "shapes"}])
    assert [answer["error"]["code"] for answer in refused] == ["UNAUTHENTICATED"] * 2  # the admin key's calls
    loaded = kserve(url, [{"call": "load", "model": "shapes", "headers": admin}])
    assert loaded == [{"model_name": "shapes", "isLoaded": True}]
    assert client.get_model_metadata("shapes").versions == ["2"]  # the highest in the store
    unloaded = kserve(url, [{"call": "unload", "model": "shapes", "headers": admin}])
    assert unloaded == [{"model_name": "shapes", "isUnloaded": True}]
    assert not client.is_model_ready("shapes")
    client.close()


def scrape(base: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
        for s in family.samples
    }


def test_sigterm_finishes_the_grpc_calls_in_flight_refuses_new_ones_and_exits_0(server_process, samples):
    # One row per batch and many rows per call: the calls stay in flight long enough to be caught by the signal.
    process, base, url = start(server_process, max_batch_size=1, max_batch_inputs=64, max_queue=4096)
    client = triton_grpc.InferenceServerClient(url)
    rows = [samples[i % len(samples)] for i in range(64)]
    inputs = grpc_inputs([s["png"] for s in rows], [s["text"] for s in rows])
    answers = []
    for _ in range(12):
        client.async_infer("shapes", inputs, callback=lambda result, error: answers.append((result, error)))
    inflight = ("dynfuse_inflight_requests", (("model", "shapes"),))
    answered = GRPC_200
    deadline = time.monotonic() + 60
    while True:  # every call has reached the server, and some are still in flight
        metrics = scrape(base)
        if metrics[inflight] + metrics[answered] == 12:
            break
        assert time.monotonic() < deadline, "the calls did not all reach the server"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert metrics[inflight] >= 1, "every call was answered before the signal: nothing was left to finish"
    # HTTP refuses new connections once uvicorn has begun its shutdown, and gRPC began its own before that.
    while True:
        assert time.monotonic() < deadline + 60, "HTTP still accepts connections after SIGTERM"
        try:
            httpx.get(f"{base}/healthz", timeout=5)
        except httpx.TransportError:
            break
        time.sleep(0.01)
    late = triton_grpc.InferenceServerClient(url)  # a new connection after the signal
    with pytest.raises(InferenceServerException) as refused:
        late.infer("shapes", grpc_inputs([rows[0]["png"]], [rows[0]["text"]]), client_timeout=30)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert process.wait(timeout=120) == 0
    assert len(answers) == 12
    assert all(error is None for _, error in answers), [str(e) for _, e in answers if e]
    assert all(result.as_numpy("label").shape == (64,) for result, _ in answers)
    client.close()


def listening_pids(port: int, pids: list[int]) -> set[int]:
    """Which of ``pids`` hold a listening TCP socket on ``port``: their socket inodes against the kernel's tables
    (gRPC binds an IPv6 socket even for 127.0.0.1, which /proc/net/tcp6 lists as ::ffff:127.0.0.1)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    holders = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.add(pid)
    return holders


def test_each_worker_serves_grpc_on_the_one_port(server_process, samples):
    process, base, url = start(server_process, workers=2)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    # Each worker binds the port once its model is warm; /readyz answered from the first one ready.
    port, deadline = int(url.rsplit(":", 1)[1]), time.monotonic() + 60
    while listening_pids(port, workers) != set(workers):
        assert time.monotonic() < deadline, f"only {listening_pids(port, workers)} of {workers} listen"
        time.sleep(0.05)
    text = grpc_inputs([samples[0]["png"]], [samples[0]["text"]])
    for _ in range(8):  # new channels, each one connection that the kernel gives to one worker
        client = triton_grpc.InferenceServerClient(url)
        assert client.infer("shapes", text).as_numpy("label").shape == (1,)
        client.close()
    calls = scrape(base)[GRPC_200]
    assert calls == 8  # summed over both workers
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_with_the_default_workers_a_grpc_load_swaps_every_worker(server_process, store_copy, samples):
    """What a user gets from ``dynfuse serve --grpc-port`` (one worker per core): each worker serves gRPC on the
    port, and a load asked of one of them over gRPC swaps every worker (the others follow the shared state)."""
    process, base, url = start(server_process, store=store_copy, workers=0, model_control="explicit",
                               admin_key=ADMIN, log_level="info")  # fmt: skip
    publish(store_copy, "2")
    workers = worker_pids(process.pid) or [process.pid]  # one core: one process serves, no supervisor
    assert len(workers) == available_cores()
    port, deadline = int(url.rsplit(":", 1)[1]), time.monotonic() + 60
    while listening_pids(port, workers) != set(workers):
        assert time.monotonic() < deadline, f"only {listening_pids(port, workers)} of {workers} listen"
        time.sleep(0.05)
    client = triton_grpc.InferenceServerClient(url)
    client.load_model("shapes", headers={"authorization": f"Bearer {ADMIN}"})
    client.close()
    text = grpc_inputs([samples[0]["png"]], [samples[0]["text"]])

    def version_on_a_new_channel() -> str:
        # A new connection, which may reach any worker: gRPC's channels share one connection per target through a
        # global subchannel pool unless told otherwise, and that one connection always reaches the same worker.
        fresh = triton_grpc.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        try:
            return fresh.infer("shapes", text).get_response().model_version
        finally:
            fresh.close()

    streak, deadline = 0, time.monotonic() + 60
    while streak < 30 and time.monotonic() < deadline:
        streak = streak + 1 if version_on_a_new_channel() == "2" else 0
    assert streak >= 30, "some worker still answers with version 1"
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == 0, log[-3000:]
    assert log.count("model shapes: serving version 2 (was 1)") == len(workers), log[-3000:]


def test_a_grpc_port_in_use_stops_the_server_at_start(tiny_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "service.cli", "serve", "--store", str(tiny_store), "--port",
                   str(free_port()), "--grpc-port", str(port)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"cannot serve gRPC on port {port} (--grpc-port, DYNFUSE_GRPC_PORT)" in done.stderr


def test_the_ray_engine_refuses_a_grpc_port_with_what_to_do(tiny_store):
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(tiny_store), "--engine", "ray",
               "--grpc-port", str(free_port())]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "served by the uvicorn engine only" in done.stderr
    assert "/v2" in done.stderr
