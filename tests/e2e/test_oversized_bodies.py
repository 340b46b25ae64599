"""A body over the limit is answered 413 in a way every client can read: the server reads and discards
what the client still sends (within bounds) before it answers, so that clients which write the whole
body before reading (urllib, requests) read the 413 instead of a connection reset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import requests
from conftest import free_port, stop_servers

pytestmark = pytest.mark.e2e

LIMIT = 4096


@pytest.fixture(scope="module")
def server(tiny_store):
    """One real server for the module, with a small body limit."""
    port = free_port()
    env = {
        **os.environ,
        "DYNFUSE_MAX_BODY_BYTES": str(LIMIT),
        "DYNFUSE_DRAIN_MAX_BYTES": str(4 << 20),
        "DYNFUSE_DRAIN_TIMEOUT_S": "5",
        "DYNFUSE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(tiny_store), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise AssertionError("dynfuse serve did not become ready in 60 s")
        yield base
    finally:
        stop_servers([process])  # its worker processes (one per core by default) go with it


def oversized(size: int) -> bytes:
    return json.dumps({"text": "x" * size}).encode()


@pytest.mark.parametrize("size", [LIMIT * 4, 2 << 20])
def test_urllib_reads_the_413(server, size):
    request = urllib.request.Request(
        f"{server}/v1/classify", data=oversized(size), headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 413
    assert json.loads(error.value.read())["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("size", [LIMIT * 4, 2 << 20])
def test_requests_reads_the_413(server, size):
    response = requests.post(
        f"{server}/v1/classify", data=oversized(size), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_requests_reads_the_413_of_a_streamed_body_without_a_length(server):
    def chunks():
        for _ in range(64):
            yield b" " * 1024

    response = requests.post(
        f"{server}/v2/models/shapes/infer", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert "over the limit" in response.json()["error"]


def test_a_connection_that_drained_its_body_serves_the_next_request(server):
    with requests.Session() as session:
        first = session.post(f"{server}/v1/classify", data=oversized(LIMIT * 2), timeout=30)
        second = session.post(f"{server}/v1/classify", json={"text": "a red circle"}, timeout=30)
    assert first.status_code == 413
    assert second.status_code == 200


def test_a_client_that_expects_100_continue_gets_the_413_before_sending_its_body(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: dynfuse\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in answer


def test_a_declared_body_beyond_the_drain_bound_is_refused_without_reading_it(server):
    # 1 GB declared and never sent: the server must not wait for it, and closes the connection.
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: dynfuse\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in answer.lower()
