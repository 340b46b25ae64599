"""``dynfuse serve --workers 2`` when a worker dies: uvicorn's supervisor replaces it, the replacement
serves the version its sibling serves (not a newer one exported meanwhile), the other worker keeps
serving, no request hangs, and the in-flight gauge forgets the dead worker's requests."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import worker_pids
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def inflight(base: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "dynfuse_inflight_requests":
                return sample.value
    raise AssertionError("no dynfuse_inflight_requests in /metrics")


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def publish_version_2(store: Path) -> None:
    """What an export running beside the server does: a newer version appears in the store."""
    newer = store / "shapes" / "2"
    shutil.copytree(store / "shapes" / "1", newer)
    manifest = json.loads((newer / "model.json").read_text())
    manifest["version"] = "2"
    (newer / "model.json").write_text(json.dumps(manifest))


def classify(base: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/classify", content=body, headers={"content-type": "application/json"}, timeout=30)


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def owner(connection: socket.socket, pids: list[int]) -> int | None:
    """The worker process holding the server's end of ``connection``: the socket inode /proc/net/tcp gives for the
    connection's two ports, found among the processes' file descriptors."""
    client_port, server_port = connection.getsockname()[1], connection.getpeername()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (server_port, client_port):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return pid
    return None


def listening_sockets(port: int) -> set[str]:
    """The socket inodes in LISTEN state on ``port`` (state 0A in /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def holders(inodes: set[str], pids: list[int]) -> dict[str, list[int]]:
    """Socket inode -> the processes among ``pids`` that hold it."""
    held: dict[str, list[int]] = {inode: [] for inode in inodes}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target in held and pid not in held[target]:
                    held[target].append(pid)
    return held


def begin_request(port: int, body: bytes) -> socket.socket:
    """A POST /v1/classify that has sent its head and half its body: admitted and in flight until the rest comes."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "POST /v1/classify HTTP/1.1\r\nHost: dynfuse\r\nContent-Type: application/json\r\n"
    connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    return connection


def answer(connection: socket.socket) -> tuple[int, dict] | None:
    """(status, JSON body) of the response on ``connection``; None when it is closed without one."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int(next(value for name, value in fields.items() if name.strip().lower() == b"content-length"))
        while len(rest) < length:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            rest += chunk
    except ConnectionResetError:
        return None
    return int(head.split()[1]), json.loads(rest[:length])


def test_a_killed_worker_is_replaced_on_the_same_version_and_its_requests_leave_the_gauge(
    server_process, store_copy, samples
):
    process, base = server_process(store=store_copy, workers=2)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    publish_version_2(store_copy)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"image": base64.b64encode(samples[0]["png"]).decode(), "text": samples[0]["text"]}).encode()
    # Ready means one worker is; each listens on a socket of its own once its model is warm.
    wait_for(lambda: len(listening_sockets(port)) == 2, "both workers listening")

    held = [begin_request(port, body) for _ in range(6)]
    wait_for(lambda: inflight(base) == 6, "6 requests in flight")
    owners = {connection: owner(connection, workers) for connection in held}
    assert set(owners.values()) <= set(workers), owners
    victim = max(workers, key=list(owners.values()).count)  # it holds requests in flight: at least 3 of the 6
    os.kill(victim, signal.SIGKILL)

    for connection, pid in owners.items():
        if pid == victim:  # reset or closed, at once: not hung
            assert answer(connection) is None
        else:  # the other worker's requests finish
            connection.sendall(body[len(body) // 2 :])
            assert answer(connection)[0] == 200
        connection.close()
    wait_for(lambda: inflight(base) == 0, "the dead worker's requests leaving dynfuse_inflight_requests")
    with ThreadPoolExecutor(4) as pool:  # the other worker kept serving
        after_kill = list(pool.map(lambda _: classify(base, body), range(4)))
    assert [r.status_code for r in after_kill] == [200] * 4

    def replaced() -> int | None:
        now = worker_pids(process.pid)
        fresh = [pid for pid in now if pid not in workers]
        return fresh[0] if len(now) == 2 and fresh else None

    replacement = wait_for(replaced, "uvicorn replacing the killed worker")
    environment = Path(f"/proc/{replacement}/environ").read_bytes().split(b"\0")
    assert b"DYNFUSE_MODEL_VERSION=1" in environment

    def served_by_the_replacement() -> dict | None:
        """A request on a new connection; its answer when the replacement took it (the kernel hands connections
        to either worker once the replacement listens)."""
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            head = "POST /v1/classify HTTP/1.1\r\nHost: dynfuse\r\nContent-Type: application/json\r\n"
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status, reply = answer(connection)
            assert status == 200, reply
            return reply if owner(connection, [replacement]) == replacement else None

    reply = wait_for(served_by_the_replacement, "a request served by the replacement worker", timeout=120)
    assert reply["model_version"] == "1"  # version 2 is in the store, but it serves the version its sibling serves
    versions = set()
    with ThreadPoolExecutor(8) as pool:
        for response in pool.map(lambda _: classify(base, body), range(24)):
            assert response.status_code == 200
            versions.add(response.json()["model_version"])
    assert versions == {"1"}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_a_load_request_to_one_worker_swaps_every_worker(server_process, store_copy):
    process, base = server_process(store=store_copy, workers=2, log_level="info", model_control="explicit")
    publish_version_2(store_copy)
    loaded = httpx.post(f"{base}/v2/repository/models/shapes/load", timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["version"] == "2"

    def version_on_a_new_connection() -> str:  # a new connection may reach either worker
        answer = httpx.post(f"{base}/v1/classify", json={"text": "a red circle"}, headers={"connection": "close"})
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]

    deadline = time.monotonic() + 60
    streak = 0
    while streak < 30 and time.monotonic() < deadline:
        streak = streak + 1 if version_on_a_new_connection() == "2" else 0
    assert streak >= 30, "some worker still answers with version 1"
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=60)[0]
    # Both workers swapped: the one that got the request, and the other one following the shared file.
    assert log.count("model shapes: serving version 2 (was 1)") == 2, log[-3000:]


def test_every_worker_listens_on_a_socket_of_its_own_and_connections_opened_at_once_reach_both(server_process, samples):
    """One shared socket let one worker's event loop accept every connection waiting when it woke: a client that
    opened 8 keep-alive connections at once had one worker doing 90% of the work in 7 runs of 8
    (bench/worker_spread.py). With a socket per worker (SO_REUSEPORT) the kernel picks a worker for each connection
    on its own."""
    process, base = server_process(workers=2)
    workers = worker_pids(process.pid)
    port = int(base.rsplit(":", 1)[1])
    wait_for(lambda: len(listening_sockets(port)) == 2, "both workers listening")  # ready: one worker is
    listening = holders(listening_sockets(port), [process.pid, *workers])
    assert len(listening) == 2, listening
    assert sorted(pid for pids in listening.values() for pid in pids) == sorted(workers), listening

    # 24 connections at once, each admitted and held open: all on one worker has odds of 2 in 2**24.
    body = json.dumps({"text": "a red circle"}).encode()
    held = [begin_request(port, body) for _ in range(24)]
    try:
        wait_for(lambda: inflight(base) == 24, "24 requests in flight")
        owners = [owner(connection, workers) for connection in held]
        assert set(owners) == set(workers), owners
        for connection in held:
            connection.sendall(body[len(body) // 2 :])
            assert answer(connection)[0] == 200
    finally:
        for connection in held:
            connection.close()


def test_workers_refuse_a_port_another_server_holds(tiny_store):
    """SO_REUSEPORT would let the workers share a port with a server already on it (connections split between
    them): the port is checked first, and dynfuse serve exits with a message instead."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another dynfuse's workers hold it
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--store", str(tiny_store), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot serve on port {port}" in done.stderr


def test_port_0_resolves_once_and_every_worker_listens_on_it(tiny_store):
    """Any free port (DYNFUSE_PORT=0) with several workers: one port for all of them, said at start."""
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(tiny_store), "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", "0", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        line = next(line for line in process.stdout if "worker processes on" in line)
        port = int(line.split("worker processes on http://127.0.0.1:")[1].split(",")[0])
        workers = wait_for(lambda: len(worker_pids(process.pid)) == 2 and worker_pids(process.pid), "two workers")
        listening = wait_for(lambda: len(listening_sockets(port)) == 2 and listening_sockets(port), "both listening")
        assert sorted(pid for pids in holders(listening, workers).values() for pid in pids) == sorted(workers)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0
