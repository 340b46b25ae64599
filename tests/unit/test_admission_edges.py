"""The front door's edges that tests/unit/test_admission_unit.py leaves open: when a body counts as read (408 or
504 at the deadline), the error codes and headers of each refusal, the key and duration each request is counted
with, which refusals are paced, and the deadline's own timer on Python 3.10 (no ``asyncio.timeout_at``),
exercised here by taking that function away."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from test_admission_unit import App, Exchange, counted, door, rejected, run

import service.admission as admission_module
from service.admission import MAX_HEADER_BYTES, Admission, run_until
from service.errors import InvalidInput
from service.metrics import Metrics


class ChunkedExchange(Exchange):
    """A body in ``chunks`` (each a receive message, sent as given), then nothing more."""

    def __init__(self, chunks: list[dict], **options):
        super().__init__(**options)
        self.chunks = chunks

    async def receive(self):
        self.reads += 1
        if self.reads > len(self.chunks):
            await asyncio.Event().wait()  # never
        return self.chunks[self.reads - 1]


class ReadsOnce(App):
    """Reads one message of the body, then never answers."""

    async def __call__(self, scope, receive, send):
        self.seen.append(scope)
        await receive()
        await asyncio.Event().wait()


def late(chunks: list[dict]) -> Exchange:
    exchange = ChunkedExchange(chunks)
    admission = door(ReadsOnce(), timeout_s=0.2)
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))
    return exchange


def test_a_body_in_one_message_without_more_body_is_read_so_a_late_answer_is_504():
    exchange = late([{"type": "http.request", "body": b"{}"}])  # ASGI: more_body absent means False

    assert exchange.status == 504
    assert exchange.json["error"]["code"] == "deadline_exceeded"
    assert exchange.json["error"]["message"] == "no answer within the request deadline of 0.2 s"
    assert exchange.headers.get(b"connection") != b"close"  # the body was read: the connection can be kept


def test_a_body_whose_first_part_promises_more_is_not_read_so_the_deadline_is_408():
    exchange = late([{"type": "http.request", "body": b"{", "more_body": True}])

    assert exchange.status == 408
    assert exchange.json["error"]["code"] == "request_timeout"
    assert exchange.json["error"]["message"] == "the request body did not arrive within 0.2 s"
    assert exchange.headers[b"connection"] == b"close"


def test_a_disconnect_ends_the_body():
    exchange = late([{"type": "http.disconnect"}])

    assert exchange.status == 504


def test_headers_over_the_limit_on_another_path_are_431_with_their_code():
    exchange = Exchange(path="/v1/models", headers=[(b"x-big", b"x" * (MAX_HEADER_BYTES + 1))])
    admission = door(App())
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))

    assert exchange.status == 431
    assert exchange.json["error"]["code"] == "headers_too_large"


def test_a_not_ready_refusal_is_counted_by_reason_and_key_says_when_to_retry_and_is_paced(monkeypatch):
    class Access:
        keys_required = True

        @staticmethod
        def key_name(authorization):
            return "team-a"

    admission = door(App(), not_serving="the model is loading", access=Access(), refusals_per_s=2)
    paced: list[float] = []
    monkeypatch.setattr(admission, "_refusal_delay", lambda: paced.append(1) or 0.0)
    exchange = Exchange(headers=[(b"authorization", b"Bearer k"), (b"content-length", b"2")])
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))

    assert exchange.status == 503
    assert exchange.headers[b"retry-after"] == b"1"
    assert rejected(admission, "not_ready") == 1
    assert counted(admission, 503, key="team-a") == 1
    assert paced == [1]  # a 503 waits its turn


def test_a_refusal_other_than_503_is_not_paced(monkeypatch):
    admission = door(App())
    paced: list[float] = []
    monkeypatch.setattr(admission, "_refusal_delay", lambda: paced.append(1) or 0.0)
    exchange = Exchange(headers=[(b"x-big", b"x" * (MAX_HEADER_BYTES + 1))])
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))

    assert exchange.status == 431
    assert rejected(admission, "too_large") == 1
    assert paced == []


def test_an_over_capacity_refusal_is_counted_under_its_key():
    class Access:
        keys_required = True

        @staticmethod
        def key_name(authorization):
            return "team-b"

    app = App(held=True)
    admission = door(app, capacity=1, access=Access())

    async def scenario():
        first = Exchange(headers=[(b"authorization", b"Bearer k"), (b"content-length", b"2")])
        second = Exchange(headers=[(b"authorization", b"Bearer k"), (b"content-length", b"2")])
        held = asyncio.ensure_future(admission(first.scope, first.receive, first.send))
        while admission.admitted < 1:
            await asyncio.sleep(0.001)
        await admission(second.scope, second.receive, second.send)
        app.release.set()
        await held
        return second

    second = run(scenario)
    assert second.status == 503
    assert counted(admission, 503, key="team-b") == 1
    assert counted(admission, 200, key="team-b") == 1


HTTP = {"model": "m", "protocol": "http"}


def test_each_request_is_timed_as_a_duration_whatever_its_answer():
    admission = door(App(), capacity=1)
    app_held = App(held=True)
    busy = door(app_held, capacity=1)
    loading = door(App(), not_serving="the model is loading")

    async def scenario():
        for front in (admission, loading):
            exchange = Exchange()
            await front(exchange.scope, exchange.receive, exchange.send)
        first, second = Exchange(), Exchange()
        held = asyncio.ensure_future(busy(first.scope, first.receive, first.send))
        while busy.admitted < 1:
            await asyncio.sleep(0.001)
        await busy(second.scope, second.receive, second.send)  # over capacity
        app_held.release.set()
        await held

    run(scenario)
    for front, answers in ((admission, 1), (loading, 1), (busy, 2)):
        registry = front.metrics.registry
        count = registry.get_sample_value("dynfuse_request_duration_seconds_count", HTTP)
        total = registry.get_sample_value("dynfuse_request_duration_seconds_sum", HTTP)
        assert count == answers
        assert 0 <= total < 60 * answers  # seconds spent, not a clock reading


@pytest.mark.parametrize("timeout_at", [True, False], ids=["Python 3.11+", "Python 3.10 (no timeout_at)"])
def test_the_deadline_timer_cancels_at_the_deadline_and_lets_an_earlier_answer_through(monkeypatch, timeout_at):
    if not timeout_at:
        monkeypatch.delattr(asyncio, "timeout_at")

    async def answer(after_s: float, done: list):
        await asyncio.sleep(after_s)
        done.append(after_s)
        return "answered"

    async def scenario():
        done: list[float] = []
        result = await run_until(time.monotonic() + 30, answer(0.01, done))  # well within its deadline
        outcomes = [(result, list(done))]
        for deadline_in, takes in ((0.05, 0.5), (-1.0, 0.01)):  # ends after its deadline; a deadline already past
            started = time.monotonic()
            try:
                await run_until(time.monotonic() + deadline_in, answer(takes, done))
                outcomes.append(("answered", list(done)))
            except TimeoutError:
                outcomes.append(("timed out", time.monotonic() - started < takes))
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert outcomes == [("answered", [0.01]), ("timed out", True), ("timed out", True)]


def test_json_of_a_refusal_is_the_protocols_error_shape():
    exchange = Exchange(path="/v2/models/shapes/infer")
    admission = door(App(), not_serving="the model is loading")
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))

    assert exchange.status == 503
    assert json.loads(exchange.sent[1]["body"]) == {"error": "the model is loading"}


def test_another_front_door_shares_the_capacity_and_is_refused_and_paced_alike(monkeypatch):
    """gRPC's door (service/grpc/): admit() takes a place of the same capacity, release() gives it back; a 503
    refusal waits its turn, another does not."""
    admission = door(App(), capacity=1)
    slept: list[float] = []

    async def recording_sleep(delay):
        slept.append(delay)

    async def scenario():
        first = admission.admit()
        held = (
            admission.admitted,
            admission.metrics.registry.get_sample_value("dynfuse_inflight_requests", {"model": "m"}),
        )
        second = admission.admit()
        monkeypatch.setattr(admission_module.asyncio, "sleep", recording_sleep)
        loop = asyncio.get_running_loop()
        now = loop.time()
        loop.time = lambda: now  # a stopped clock: the pace is computed, not timed
        await admission.pace(second)  # the first refusal: its turn is now
        await admission.pace(second)  # the next one: one interval later
        await admission.pace(InvalidInput("not a 503"))
        del loop.time
        monkeypatch.undo()
        admission.release()
        third = admission.admit()
        return first, held, second, third

    first, held, second, third = run(scenario)
    assert first is None
    assert held == (1, 1.0)
    assert second.status == 503
    assert second.message == "the server is at capacity (1 requests in flight); retry after 1 s"
    assert slept == [pytest.approx(1 / 200, abs=1e-9)]  # the default pace: 200 refusals a second
    assert third is None
    assert admission.admitted == 1
    roomy = door(App(), capacity=3)
    assert [roomy.admit(), roomy.admit()] == [None, None]
    assert roomy.admitted == 2  # each admission counted, not merely noted


def test_other_scopes_reach_the_app_with_their_own_receive():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], receive))

    async def receive():
        return {"type": "lifespan.startup"}

    admission = Admission(
        app, state=SimpleNamespace(), metrics=Metrics("m"), capacity=1, request_timeout_s=1.0, max_body_bytes=10
    )
    run(lambda: admission({"type": "lifespan"}, receive, None))

    assert seen == [("lifespan", receive)]


def test_a_state_without_keys_configured_counts_requests_as_anonymous():
    app = App()
    admission = Admission(
        app, state=SimpleNamespace(repository=SimpleNamespace(not_serving=None)), metrics=Metrics("m"), capacity=1,
        request_timeout_s=5.0, max_body_bytes=100,
    )  # fmt: skip
    exchange = Exchange()
    run(lambda: admission(exchange.scope, exchange.receive, exchange.send))

    assert exchange.status == 200
    assert counted(admission, 200) == 1
