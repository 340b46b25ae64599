"""Soak and chaos: mixed traffic against ``dynfuse serve --workers 2``, then one worker killed under load.

The traffic mixes, with fixed weights and a seeded choice: good requests (JSON, multipart, text only,
a big palette image, batch calls, /v2), bad ones (invalid base64, not an image, a fuzzed image, a
TIFF, truncated, malformed JSON, a wrong content type), oversized bodies, clients that disconnect
mid-body or before the answer, and clients that send half a body and stall. Every answer must be a
2xx or 4xx: a 5xx (or a hang, which the client's timeout turns into an error) fails the run.

Phases: warm-up (not measured; every pool and cache reaches its size), then the soak, with the
resident memory, open file descriptors and threads of every server process recorded before and
after; then chaos: traffic again, one worker killed with SIGKILL in the middle, and the replacement
awaited. Expected: 0 x 5xx, RSS growth < 10%, no more file descriptors or threads at the end than at
the start, the killed worker replaced while the other keeps serving, and no request hanging.

    python -m bench.soak                  # 10 minutes of soak -> bench/results/soak.json
    python -m bench.soak --minutes 1      # what the CI test runs, shorter
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import DEFAULT_DATA, DEFAULT_STORE, REPO, RESULTS, free_port, load_test_split, write_result

MAX_BODY_BYTES = 1 << 20  # lower than the default, so that oversized bodies stay cheap to send
REQUEST_TIMEOUT_S = 4.0  # the stalled clients get their 408 after this
CLIENT_TIMEOUT_S = 30.0  # a request with no answer by then counts as hung
CONCURRENCY = 8  # below the server's capacity: a 503 would be a failure too


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # by HTTP status, as str
    kinds: Counter = field(default_factory=Counter)  # requests sent, by kind
    errors: Counter = field(default_factory=Counter)  # client-side failures of requests that expected an answer
    unexpected: list = field(default_factory=list)  # (kind, status or error) that broke a rule, first 20

    def note(self, kind: str, outcome) -> None:
        self.kinds[kind] += 1
        if isinstance(outcome, int):
            self.statuses[str(outcome)] += 1
            if outcome >= 500 and len(self.unexpected) < 20:
                self.unexpected.append((kind, outcome))
        elif outcome is not None:
            self.errors[outcome] += 1
            if len(self.unexpected) < 20:
                self.unexpected.append((kind, outcome))

    def as_dict(self) -> dict:
        return {
            "requests": sum(self.kinds.values()),
            "by_status": dict(sorted(self.statuses.items())),
            "server_errors_5xx": sum(n for status, n in self.statuses.items() if status.startswith("5")),
            "client_errors": dict(self.errors),
            "by_kind": dict(sorted(self.kinds.items())),
            "unexpected": self.unexpected,
        }


class Traffic:
    """The request mix: each kind is an async function returning a status, None (no answer expected)
    or raising."""

    def __init__(self, base: str, model: str, samples: list[dict], seed: int):
        self.base = base
        self.host, self.port = base.removeprefix("http://").split(":")
        self.model = model
        self.samples = samples
        self.rng = random.Random(seed)
        self.kinds = {  # name: (weight, coroutine function)
            "good_json": (30, self.good_json),
            "good_multipart": (8, self.good_multipart),
            "text_only": (8, self.text_only),
            "big_palette_image": (2, self.big_image),
            "batch": (5, self.batch),
            "v2_infer": (6, self.v2_infer),
            "invalid_base64": (3, self.invalid_base64),
            "not_an_image": (3, self.not_an_image),
            "fuzzed_image": (6, self.fuzzed_image),
            "tiff": (2, self.tiff),
            "malformed_json": (3, self.malformed_json),
            "wrong_content_type": (2, self.wrong_content_type),
            "oversized_body": (2, self.oversized),
            "disconnect_mid_body": (3, self.disconnect_mid_body),
            "disconnect_before_answer": (3, self.disconnect_before_answer),
            "stalled_body": (1, self.stalled_body),
        }
        self.big_png = _palette_png(2048)
        self.tiff_bytes = _encoded("TIFF", (40, 30))

    def pick(self):
        names = list(self.kinds)
        weights = [self.kinds[name][0] for name in names]
        name = self.rng.choices(names, weights)[0]
        return name, self.kinds[name][1]

    def sample(self) -> dict:
        return self.samples[self.rng.randrange(len(self.samples))]

    # -- the kinds ---------------------------------------------------------------------------------
    async def good_json(self, client):
        s = self.sample()
        return await self._post(client, "/v1/classify", json={"image": _b64(s["png"]), "text": s["text"]})

    async def good_multipart(self, client):
        s = self.sample()
        files = {"image": ("s.png", s["png"], "image/png")}
        return await self._post(client, "/v1/classify", files=files, data={"text": s["text"]})

    async def text_only(self, client):
        return await self._post(client, "/v1/classify", json={"text": self.sample()["text"]})

    async def big_image(self, client):
        return await self._post(client, "/v1/classify", json={"image": _b64(self.big_png), "text": "a red circle"})

    async def batch(self, client):
        inputs = [{"id": str(i), "image": _b64(s["png"]), "text": s["text"]} for i, s in enumerate(self._some(4))]
        return await self._post(client, "/v1/classify/batch", json={"inputs": inputs})

    async def v2_infer(self, client):
        rows = self._some(2)
        body = {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [2], "data": [_b64(s["png"]) for s in rows]},
                {"name": "text", "datatype": "BYTES", "shape": [2], "data": [s["text"] for s in rows]},
            ]
        }
        return await self._post(client, f"/v2/models/{self.model}/infer", json=body)

    async def invalid_base64(self, client):
        return await self._post(client, "/v1/classify", json={"image": "@@not base64@@", "text": "x"})

    async def not_an_image(self, client):
        return await self._post(client, "/v1/classify", json={"image": _b64(b"plain text, no picture")})

    async def fuzzed_image(self, client):
        data = bytearray(self.sample()["png"])
        for _ in range(self.rng.randint(1, 12)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        if self.rng.random() < 0.3:
            del data[self.rng.randrange(8, len(data)) :]
        return await self._post(client, "/v1/classify", json={"image": _b64(bytes(data)), "text": "x"})

    async def tiff(self, client):
        return await self._post(client, "/v1/classify", json={"image": _b64(self.tiff_bytes)})

    async def malformed_json(self, client):
        headers = {"content-type": "application/json"}
        return await self._post(client, "/v1/classify", content=b'{"text": "unclosed', headers=headers)

    async def wrong_content_type(self, client):
        return await self._post(client, "/v1/classify", content=b"text=hi", headers={"content-type": "text/plain"})

    async def oversized(self, client):
        body = b'{"text": "' + b"x" * (MAX_BODY_BYTES + 4096) + b'"}'
        headers = {"content-type": "application/json"}
        return await self._post(client, "/v1/classify", content=body, headers=headers)

    async def disconnect_mid_body(self, _client):
        body = json.dumps({"image": _b64(self.sample()["png"]), "text": "x"}).encode()
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        writer.write(self._head(len(body)) + body[: len(body) // 2])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def disconnect_before_answer(self, _client):
        body = json.dumps({"image": _b64(self.sample()["png"]), "text": "x"}).encode()
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        writer.write(self._head(len(body)) + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def stalled_body(self, _client):
        """Half a body, then nothing: the server answers 408 at the request's deadline and closes."""
        body = json.dumps({"text": "a red circle"}).encode()
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        try:
            writer.write(self._head(len(body)) + body[:5])
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(200), CLIENT_TIMEOUT_S)
        finally:
            writer.close()
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else "no answer"

    # -- helpers -------------------------------------------------------------------------------------
    def _some(self, n: int) -> list[dict]:
        return [self.sample() for _ in range(n)]

    def _head(self, length: int) -> bytes:
        return (
            f"POST /v1/classify HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()

    async def _post(self, client, path: str, **kwargs) -> int:
        response = await client.post(f"{self.base}{path}", **kwargs)
        return response.status_code


async def prime(traffic: Traffic, concurrency: int = CONCURRENCY) -> None:
    """Every kind, ``concurrency`` at a time, on fresh connections (so that every worker gets some): each
    pool (decode threads, allocator arenas) reaches its size before the start is recorded, so that what
    grows afterwards is growth, not warm-up."""
    import httpx

    async with httpx.AsyncClient(limits=_limits(concurrency), timeout=CLIENT_TIMEOUT_S) as client:
        for name, (_weight, kind) in traffic.kinds.items():
            if name != "stalled_body":  # waits out a deadline; the timed warm-up sends some
                await asyncio.gather(*(kind(client) for _ in range(concurrency)), return_exceptions=True)


async def drive(traffic: Traffic, seconds: float, tally: Tally, concurrency: int = CONCURRENCY) -> None:
    """``concurrency`` closed-loop clients sending the mix for ``seconds``."""
    import httpx

    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(limits=_limits(concurrency), timeout=CLIENT_TIMEOUT_S) as client:

        async def one_client():
            while time.monotonic() < stop_at:
                name, kind = traffic.pick()
                try:
                    outcome = await kind(client)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError) as error:
                    outcome = type(error).__name__
                tally.note(name, outcome)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


def _limits(concurrency: int):
    """No keep-alive: each request opens a connection, which the kernel hands to either worker (kept-alive
    connections would stay with whichever worker accepted them first), and the descriptors churn."""
    import httpx

    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)


# -- the server's processes ---------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(found)


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes (spawned; the multiprocessing resource tracker is not one)."""
    return [child for child in children(pid) if b"spawn_main" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_stats(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


def snapshot(supervisor: int) -> dict:
    pids = [supervisor, *workers_of(supervisor)]
    return {str(pid): process_stats(pid) for pid in pids}


def settled_snapshot(supervisor: int, start: dict, wait_s: float = 20.0) -> dict:
    """The end snapshot, once in-flight connections have closed and idle threads have exited (bounded)."""
    deadline = time.monotonic() + wait_s
    while True:
        now = snapshot(supervisor)
        settled = all(
            pid in now and now[pid]["fds"] <= start[pid]["fds"] and now[pid]["threads"] <= start[pid]["threads"]
            for pid in start
        )
        if settled or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def compare(start: dict, end: dict) -> dict:
    rows = {}
    for pid, before in start.items():
        after = end.get(pid)
        if after is None:
            rows[pid] = {"start": before, "end": None}
            continue
        rows[pid] = {
            "start": before,
            "end": after,
            "rss_growth": round(after["rss_mib"] / before["rss_mib"] - 1, 4),
            "fds_added": after["fds"] - before["fds"],
            "threads_added": after["threads"] - before["threads"],
        }
    total_start = sum(v["rss_mib"] for v in start.values())
    total_end = sum(v["rss_mib"] for pid, v in end.items() if pid in start)
    return {"processes": rows, "total_rss_mib": {"start": total_start, "end": total_end}}


# -- a run ----------------------------------------------------------------------------------------
def start_server(store: Path, log: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "DYNFUSE_LOG_LEVEL": "warning",
        "DYNFUSE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "DYNFUSE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--store", str(store), "--port", str(port)]
    command += ["--workers", str(workers)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dynfuse serve exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
                if response.status == 200 and len(workers_of(process.pid)) == workers:
                    return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("dynfuse serve was not ready after 120 s")


def run(
    store: Path,
    samples: list[dict],
    *,
    soak_s: float,
    warmup_s: float = 20.0,
    chaos_s: float = 20.0,
    workers: int = 2,
    seed: int = 0,
    log: Path | None = None,
    progress=print,
) -> dict:
    log = log or Path(f"/tmp/dynfuse-soak-{os.getpid()}.log")
    model = store_model_name(store)
    process, base = start_server(store, log, workers)
    result: dict = {"workers": workers, "phases_s": {"warmup": warmup_s, "soak": soak_s, "chaos": chaos_s}}
    try:
        traffic = Traffic(base, model, samples, seed)
        progress(f"warm-up {warmup_s:g} s")
        warm_up(process.pid, traffic, warmup_s)
        time.sleep(2.0)
        start = snapshot(process.pid)
        progress(f"soak {soak_s:g} s")
        soak = Tally()
        asyncio.run(drive(traffic, soak_s, soak))
        end = settled_snapshot(process.pid, start)
        result["soak"] = soak.as_dict() | {"requests_per_second": sum(soak.kinds.values()) / soak_s}
        result["resources"] = compare(start, end)
        progress(f"chaos {chaos_s:g} s: one worker killed at {chaos_s / 3:.0f} s")
        result["chaos"] = chaos(process.pid, traffic, chaos_s)
        process.send_signal(signal.SIGTERM)
        result["exit_code"] = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    server_log = log.read_text()
    result["server_log"] = {
        "unhandled_errors": server_log.count("unhandled error"),
        "tracebacks": server_log.count("Traceback"),
        "lines": len(server_log.splitlines()),
    }
    result["verdict"] = verdict(result)
    return result


def warm_up(supervisor: int, traffic: Traffic, seconds: float, rounds: int = 6) -> None:
    """Prime every kind until every worker has started the same threads (its decode pool included), then
    ``seconds`` of the mix."""
    for _ in range(rounds):
        asyncio.run(prime(traffic))
        threads = {process_stats(pid)["threads"] for pid in workers_of(supervisor)}
        if len(threads) == 1:
            break
    asyncio.run(drive(traffic, seconds, Tally()))


def chaos(supervisor: int, traffic: Traffic, seconds: float) -> dict:
    before = workers_of(supervisor)
    victim = before[0]
    tally = Tally()
    kill_at = seconds / 3

    async def scenario():
        async def killer():
            await asyncio.sleep(kill_at)
            os.kill(victim, signal.SIGKILL)

        await asyncio.gather(drive(traffic, seconds, tally), killer())

    asyncio.run(scenario())
    deadline = time.monotonic() + 60
    after = workers_of(supervisor)
    while (len(after) < len(before) or victim in after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = workers_of(supervisor)
    survivor = [pid for pid in before if pid != victim]
    return tally.as_dict() | {
        "killed": victim,
        "workers_before": before,
        "workers_after": after,
        "replaced": len(after) == len(before) and victim not in after,
        "survivor_kept_serving": all(pid in after for pid in survivor) and tally.statuses["200"] > 0,
    }


def verdict(result: dict) -> dict:
    soak, chaos_phase, resources = result["soak"], result["chaos"], result["resources"]
    growth = {pid: row.get("rss_growth") for pid, row in resources["processes"].items()}
    checks = {
        "no_5xx": soak["server_errors_5xx"] == 0 and chaos_phase["server_errors_5xx"] == 0,
        "no_client_errors_in_soak": not soak["client_errors"],
        "rss_growth_under_10_percent": all(g is not None and g < 0.10 for g in growth.values()),
        "no_leaked_fds": all(row.get("fds_added", 1) <= 0 for row in resources["processes"].values()),
        "no_leaked_threads": all(row.get("threads_added", 1) <= 0 for row in resources["processes"].values()),
        "killed_worker_replaced": chaos_phase["replaced"],
        "survivor_kept_serving": chaos_phase["survivor_kept_serving"],
        # Only the killed worker's own connections may fail, and none may hang (a timeout).
        "no_request_hung": "ReadTimeout" not in chaos_phase["client_errors"]
        and "TimeoutError" not in chaos_phase["client_errors"],
        "clean_exit": result["exit_code"] == 0 and result["server_log"]["unhandled_errors"] == 0,
    }
    return checks | {"passed": all(checks.values())}


def store_model_name(store: Path) -> str:
    from export.store import resolve

    return resolve(store).parent.name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encoded(fmt: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def _palette_png(side: int) -> bytes:
    from PIL import Image

    image = Image.new("P", (side, side))
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    image.paste(9, (0, 0, side // 3, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak phase")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of warm-up traffic")
    parser.add_argument("--chaos", type=float, default=30.0, help="seconds of the chaos phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    samples = load_test_split(args.data)[:300]
    result = run(args.store, samples, soak_s=60 * args.minutes, warmup_s=args.warmup, chaos_s=args.chaos)
    print(json.dumps({k: result[k] for k in ("soak", "resources", "verdict")}, indent=1))
    write_result(args.out, {"figure": "soak and chaos", **result})
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
