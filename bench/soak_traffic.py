"""bench/soak.py's traffic: the request mix (good, bad, fuzzed, oversized, disconnecting and stalled
clients, batch and /v2), closed-loop clients that send it, and the tally of what came back."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

MAX_BODY_BYTES = 1 << 20  # the server's limit in a soak: lower than the default, so oversized bodies stay cheap
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
