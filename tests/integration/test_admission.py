"""Admission before work, deadlines and readiness, at the ASGI level: a refused request's body is never
read, a request past its deadline is answered 504 (or 408 when its body never came), and both are
counted; /readyz follows the micro-batcher."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time

import pytest
from conftest import b64, scrape, value
from PIL import Image

from service.config import Settings
from service.main import create_app


@contextlib.asynccontextmanager
async def started(store, **settings):
    app = create_app(Settings(store=store, **settings))
    async with app.router.lifespan_context(app):
        for _ in range(600):
            if app.state.service is not None:
                break
            await asyncio.sleep(0.05)
        assert app.state.service is not None, app.state.load_error
        yield app


async def until(condition, what: str, timeout: float = 30.0) -> None:
    """Wait for ``condition()`` on the event loop, with a deadline generous enough for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        await asyncio.sleep(0.01)


def inflight(app) -> float:
    return app.state.metrics.registry.get_sample_value("dynfuse_inflight_requests", {"model": "shapes"})


def scope(path: str = "/v1/classify", headers: list | None = None) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [(b"content-type", b"application/json"), (b"host", b"dynfuse")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }


class Exchange:
    """One request through the app: ``body`` is served to ``receive`` (None: the body never comes)."""

    def __init__(self, body: bytes | None):
        self.body = body
        self.reads = 0
        self.sent: list[dict] = []

    async def receive(self):
        self.reads += 1
        if self.body is None:
            await asyncio.sleep(3600)
        if self.reads == 1:
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.sleep(3600)  # nothing more: the client waits for the answer
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    def header(self, name: bytes) -> bytes | None:
        return dict(self.sent[0]["headers"]).get(name)


def held_pipeline(app) -> threading.Event:
    """Make every batch wait until the returned event is set."""
    gate = threading.Event()
    pipeline = app.state.service.pipeline
    real = pipeline.predict

    def held(items):
        gate.wait(timeout=30)
        return real(items)

    pipeline.predict = held
    return gate


def test_over_capacity_is_refused_503_before_its_body_is_read(tiny_store):
    async def scenario():
        async with started(tiny_store, max_inflight=2) as app:
            gate = held_pipeline(app)
            body = b'{"text": "a red circle"}'
            admitted = [Exchange(body) for _ in range(2)]
            running = [asyncio.ensure_future(app(scope(), e.receive, e.send)) for e in admitted]
            await until(lambda: inflight(app) == 2, "both admitted")
            refused = Exchange(body)
            started_at = time.monotonic()
            await app(scope(), refused.receive, refused.send)
            refused_in = time.monotonic() - started_at
            gate.set()
            await asyncio.wait_for(asyncio.gather(*running), 30)
            return admitted, refused, refused_in, app.state.metrics.registry

    admitted, refused, refused_in, registry = asyncio.run(scenario())
    assert [e.status for e in admitted] == [200, 200]
    assert refused.status == 503
    assert refused.reads == 0  # its body was never read, so never parsed or decoded
    assert refused.header(b"retry-after") == b"1"
    assert b'"overloaded"' in refused.sent[1]["body"]
    assert refused_in < 5.0  # answered, not held like the admitted ones (30 s), with room for a loaded machine
    labels = {"model": "shapes", "reason": "over_capacity"}
    assert registry.get_sample_value("dynfuse_rejected_requests_total", labels) == 1
    http_503 = {"model": "shapes", "status": "503", "protocol": "http", "key": "anonymous"}
    assert registry.get_sample_value("dynfuse_requests_total", http_503) == 1
    assert registry.get_sample_value("dynfuse_inflight_requests", {"model": "shapes"}) == 0


def test_before_the_model_is_loaded_a_request_is_refused_without_reading_its_body(tiny_store, held_model_load):
    async def scenario():
        app = create_app(Settings(store=tiny_store))
        async with app.router.lifespan_context(app):
            exchange = Exchange(b'{"text": "a red circle"}')
            await app(scope(), exchange.receive, exchange.send)
            held_model_load.set()
            return exchange

    exchange = asyncio.run(scenario())
    assert exchange.status == 503
    assert exchange.reads == 0
    assert b"not_ready" in exchange.sent[1]["body"]


def test_headers_over_the_limit_are_431(tiny_store):
    async def scenario():
        async with started(tiny_store) as app:
            huge = [(b"content-type", b"application/json"), (b"x-padding", b"x" * 70_000)]
            exchange = Exchange(b'{"text": "a red circle"}')
            await app(scope(headers=huge), exchange.receive, exchange.send)
            return exchange

    exchange = asyncio.run(scenario())
    assert exchange.status == 431
    assert exchange.reads == 0


def test_a_request_past_its_deadline_is_504_and_counted(tiny_store):
    async def scenario():
        async with started(tiny_store, request_timeout_s=0.3) as app:
            gate = held_pipeline(app)
            exchange = Exchange(b'{"text": "a red circle"}')
            begun = time.monotonic()
            await app(scope(), exchange.receive, exchange.send)
            took = time.monotonic() - begun
            gate.set()
            batcher = app.state.service.batcher
            await until(lambda: batcher._batch_started is None, "the held batch finished")
            after = Exchange(b'{"text": "a red circle"}')
            await app(scope(), after.receive, after.send)
            return exchange, took, after, app.state.metrics.registry

    exchange, took, after, registry = asyncio.run(scenario())
    assert exchange.status == 504
    assert b'"deadline_exceeded"' in exchange.sent[1]["body"]
    assert 0.25 < took < 5.0  # its own deadline (0.3 s), not the default (10 s), with room for a loaded machine
    assert after.status == 200  # the server keeps serving
    assert registry.get_sample_value("dynfuse_rejected_requests_total", {"model": "shapes", "reason": "deadline"}) == 1
    http_504 = {"model": "shapes", "status": "504", "protocol": "http", "key": "anonymous"}
    assert registry.get_sample_value("dynfuse_requests_total", http_504) == 1


def test_a_body_that_never_arrives_is_408_and_closes_the_connection(tiny_store):
    async def scenario():
        async with started(tiny_store, request_timeout_s=0.3) as app:
            exchange = Exchange(None)
            await app(scope(), exchange.receive, exchange.send)
            return exchange, app.state.metrics.registry

    exchange, registry = asyncio.run(scenario())
    assert exchange.status == 408
    assert exchange.header(b"connection") == b"close"
    labels = {"model": "shapes", "reason": "body_timeout"}
    assert registry.get_sample_value("dynfuse_rejected_requests_total", labels) == 1


def test_v2_answers_its_own_error_shape_at_admission(tiny_store):
    async def scenario():
        async with started(tiny_store, request_timeout_s=0.3) as app:
            exchange = Exchange(None)
            await app(scope("/v2/models/shapes/infer"), exchange.receive, exchange.send)
            return exchange

    exchange = asyncio.run(scenario())
    assert exchange.status == 408
    assert exchange.sent[1]["body"].startswith(b'{"error": "')


def test_readiness_is_503_while_the_batcher_is_not_running(serve):
    client = serve()
    assert client.get("/readyz").status_code == 200
    batcher = client.app.state.service.batcher
    batcher._backoff_until = time.monotonic() + 60  # what a failure leaves behind: backing off
    ready = client.get("/readyz")
    assert ready.status_code == 503
    reason = "restarting after 0 consecutive failure(s)"
    assert ready.json() == {
        "status": "unavailable",
        "model": "shapes",
        "reason": reason,
        "batcher": reason,
        "models": {"shapes": {"version": "1", "ready": False, "reason": reason}},
    }
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/models/shapes/ready").json() == {"name": "shapes", "ready": False, "reason": reason}
    batcher._backoff_until = 0.0
    assert client.get("/readyz").status_code == 200


def palette_png(side: int) -> bytes:
    image = Image.new("P", (side, side))
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    image.paste(7, (0, 0, side // 3, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_where_an_image_decodes_is_decided_by_its_pixel_count_not_its_size_in_bytes(serve, monkeypatch, samples):
    import service.inference as inference

    threads = []
    real = inference.ImageDecoder.pixels_now  # every decode, Pillow's or libspng's (service/decode.py)

    def recording(self, opened):
        threads.append((opened.pixels, threading.current_thread().name))
        return real(self, opened)

    monkeypatch.setattr(inference.ImageDecoder, "pixels_now", recording)
    client = serve()
    small, big = samples[0]["png"], palette_png(4096)
    assert len(big) < 64 * 1024  # small in bytes: the old rule would decode it on the event loop
    for image in (small, big):
        response = client.post("/v1/classify", json={"image": b64(image), "text": "a red circle"})
        assert response.status_code == 200, response.text
    (small_pixels, small_thread), (big_pixels, big_thread) = threads
    assert small_pixels <= inference.INLINE_DECODE_PIXELS
    assert not small_thread.startswith("dynfuse-decode")
    assert big_pixels == 4096 * 4096
    assert big_thread.startswith("dynfuse-decode")


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/batch", "/v2/models/shapes/infer"])
def test_every_refusal_and_answer_is_counted_by_status(serve, path):
    client = serve(max_inflight=1)
    response = client.post(path, content=b"{", headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    samples = scrape(client)
    status = str(response.status_code)
    labels = {"model": "shapes", "protocol": "http", "key": "anonymous"}
    assert value(samples, "dynfuse_requests_total", status=status, **labels) == 1
    assert value(samples, "dynfuse_inflight_requests", model="shapes") == 0


def frozen_clock(work):
    """``work()`` with the event loop's clock stopped: the pace is computed from it, and a loaded machine may let
    milliseconds pass between two refusals."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    loop.time = lambda: now
    try:
        return work()
    finally:
        del loop.time


def test_refusals_are_paced_and_never_held_longer_than_the_maximum():
    from service.admission import Admission
    from service.metrics import Metrics

    async def delays():
        admission = Admission(
            None,
            state=None,
            metrics=Metrics("m"),
            capacity=1,
            request_timeout_s=10,
            max_body_bytes=1024,
            refusals_per_s=10,
            max_refusal_hold_s=0.35,
        )
        return frozen_clock(lambda: [admission._refusal_delay() for _ in range(6)])

    got = asyncio.run(delays())
    # One refusal every 0.1 s: the first at once, then in turn, but none held past 0.35 s.
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.35, 0.35], abs=1e-9)


def test_at_capacity_the_playground_docs_and_probes_are_still_served(tiny_store):
    """Admission guards the inference routes only: the page, its static files, the docs and the probes are
    answered at once while every inference slot is taken."""

    def get(path: str) -> dict:
        return {**scope(path, headers=[(b"host", b"dynfuse")]), "method": "GET"}

    async def scenario():
        async with started(tiny_store, max_inflight=1) as app:
            gate = held_pipeline(app)
            admitted = Exchange(b'{"text": "a red circle"}')
            running = asyncio.ensure_future(app(scope(), admitted.receive, admitted.send))
            await until(lambda: inflight(app) == 1, "the one slot taken")
            refused = Exchange(b'{"text": "a red circle"}')
            await app(scope(), refused.receive, refused.send)
            answers = {}
            for path in ("/", "/static/app.js", "/docs", "/docs-assets/swagger-ui.css", "/openapi.json", "/readyz"):
                exchange = Exchange(b"")
                begun = time.monotonic()
                await app(get(path), exchange.receive, exchange.send)
                answers[path] = (exchange.status, time.monotonic() - begun)
            gate.set()
            await asyncio.wait_for(running, 30)
            return refused, answers

    refused, answers = asyncio.run(scenario())
    assert refused.status == 503
    for path, (status, took) in answers.items():
        assert status == 200, path
        assert took < 5.0, path  # not held behind the inference slot (30 s), with room for a loaded machine


def test_the_refusal_pace_is_the_setting(tiny_store):
    app = create_app(Settings(store=tiny_store, refusals_per_s=10))

    async def delays():
        return frozen_clock(lambda: [app.front_door._refusal_delay() for _ in range(3)])

    assert asyncio.run(delays()) == pytest.approx([0.0, 0.1, 0.2], abs=1e-9)  # DYNFUSE_REFUSALS_PER_S=10
