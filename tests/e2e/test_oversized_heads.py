"""A request head (request line and headers) is bounded on every path by the server's HTTP protocol
(service/http_protocol.py): a huge header line, a huge URL or a flood of headers is refused at once, without
the server buffering it or spending its event loop on it, and the server goes on serving."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def exchange(base: str, request: bytes, timeout: float = 30.0) -> bytes:
    """Send ``request`` on a fresh connection; what came back (b"" if the server reset it while it was sent)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        try:
            connection.sendall(request)
            return connection.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def cpu_seconds(pid: int) -> float:
    """The CPU time the process has used (user and system): what the server spends, whatever else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


@pytest.mark.parametrize(
    ("request_bytes", "what"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000_000 + b"\r\n\r\n", "a 30 MB header"),
        (b"GET /healthz?" + b"a" * 3_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "a 3 MB URL"),
        (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(50_000)) + b"\r\n", "50k headers"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", "100 KB of headers"),
    ],
)
def test_an_oversized_head_is_refused_at_once_on_any_path(server_process, request_bytes, what):
    process, base = server_process(log_level="warning")
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    before = peak_rss_mib(process.pid)
    cpu_before = cpu_seconds(process.pid)
    answer = exchange(base, request_bytes)
    spent = cpu_seconds(process.pid) - cpu_before
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), (what, answer[:200])
    assert spent < 3, (what, spent)  # was 16 s for a 50 MB header, the event loop busy meanwhile
    assert peak_rss_mib(process.pid) - before < 20, what  # was 94 MiB for 50 MB
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def test_a_large_body_behind_small_headers_is_not_taken_for_a_large_head(server_process):
    """The head is counted in whole chunks received while it is incomplete: a body that starts in the same chunk
    must not count."""
    process, base = server_process(log_level="warning")
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "text": "a red circle"}).encode()
    assert len(body) > 5_000_000
    response = httpx.post(f"{base}/v1/classify", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
