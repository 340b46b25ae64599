"""The front door (service/admission.py) alone, in front of a scripted ASGI app: what is refused before a byte of
its body is read (431, 503 not ready, 503 over capacity), in which protocol's shape, whether the connection is
kept, the deadline of an admitted request (408 before its body came, 504 after), and what is counted. The app
behind it is the suite's integration tests' business (tests/integration/test_admission.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from service.admission import MAX_HEADER_BYTES, Admission, deadline_of
from service.metrics import Metrics


class Exchange:
    """One request: its scope, the body ``receive`` hands out (None: it never comes), what was sent back."""

    def __init__(self, path="/v1/classify", body: bytes | None = b"{}", headers=None):
        self.scope = {
            "type": "http",
            "path": path,
            "method": "POST",
            "headers": headers if headers is not None else [(b"content-length", str(len(body or b"")).encode())],
        }
        self.body = body
        self.reads = 0
        self.sent: list[dict] = []

    async def receive(self):
        self.reads += 1
        if self.body is None or self.reads > 1:
            await asyncio.Event().wait()  # never
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def json(self):
        return json.loads(self.sent[1]["body"])


class App:
    """The app behind the door: reads the body, then answers 200 once ``release`` is set (at once by default)."""

    def __init__(self, *, held: bool = False, answer_after_body: bool = True, fail: bool = False):
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.answer_after_body = answer_after_body
        self.fail = fail
        self.seen: list[dict] = []
        self.entered = 0

    async def __call__(self, scope, receive, send):
        self.seen.append(scope)
        self.entered += 1
        if scope["type"] == "http" and self.answer_after_body:
            await receive()
        if self.fail:
            raise RuntimeError("the app died")
        if not self.answer_after_body:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await self.release.wait()
        if self.answer_after_body:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def door(app, *, capacity=2, timeout_s=30.0, not_serving=None, access=None, **options) -> Admission:
    state = SimpleNamespace(repository=SimpleNamespace(not_serving=not_serving), access=access)
    return Admission(
        app, state=state, metrics=Metrics("m"), capacity=capacity, request_timeout_s=timeout_s, max_body_bytes=1000,
        **options,
    )  # fmt: skip


def counted(admission: Admission, status: int, key: str = "anonymous") -> float:
    labels = {"model": "m", "status": str(status), "key": key, "protocol": "http"}
    return admission.metrics.registry.get_sample_value("dynfuse_requests_total", labels) or 0.0


def rejected(admission: Admission, reason: str) -> float:
    labels = {"model": "m", "reason": reason}
    return admission.metrics.registry.get_sample_value("dynfuse_rejected_requests_total", labels) or 0.0


def inflight(admission: Admission) -> float:
    return admission.metrics.registry.get_sample_value("dynfuse_inflight_requests", {"model": "m"})


async def until(condition, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 60))


def test_an_admitted_request_reaches_the_app_with_a_deadline_and_is_counted_in_flight_until_answered():
    app = App(held=True)
    admission = door(app, timeout_s=30)

    async def scenario():
        exchange = Exchange()
        task = asyncio.create_task(admission(exchange.scope, exchange.receive, exchange.send))
        await until(lambda: app.entered == 1)
        during = (inflight(admission), admission.admitted)
        app.release.set()
        await task
        return exchange, during

    exchange, during = run(scenario)
    assert exchange.status == 200
    assert during == (1.0, 1)
    assert (inflight(admission), admission.admitted) == (0.0, 0)
    assert counted(admission, 200) == 1
    deadline = deadline_of(app.seen[0])
    assert deadline is not None
    assert deadline_of({}) is None


@pytest.mark.parametrize(("path", "v2"), [("/v1/classify", False), ("/v2/models/m/infer", True)])
def test_at_capacity_a_request_is_refused_503_in_its_protocols_shape_without_its_body_read(path, v2):
    app = App(held=True)
    admission = door(app, capacity=2)

    async def scenario():
        admitted = [Exchange() for _ in range(2)]
        tasks = [asyncio.create_task(admission(e.scope, e.receive, e.send)) for e in admitted]
        await until(lambda: app.entered == 2)
        refused = Exchange(path)
        await admission(refused.scope, refused.receive, refused.send)
        app.release.set()
        await asyncio.gather(*tasks)
        return refused

    refused = run(scenario)
    assert refused.status == 503
    assert refused.reads == 0
    assert refused.headers[b"retry-after"] == b"1"
    assert b"connection" not in refused.headers  # a declared body within the limit: the connection is kept
    message = "the server is at capacity (2 requests in flight); retry after 1 s"
    assert refused.json == ({"error": message} if v2 else {"error": {"code": "overloaded", "message": message}})
    assert rejected(admission, "over_capacity") == 1
    assert counted(admission, 503) == 1
    assert counted(admission, 200) == 2


@pytest.mark.parametrize(
    ("headers", "closes"),
    [
        ([(b"content-length", b"1000")], False),  # the limit itself: the server's parser discards it
        ([(b"content-length", b"1001")], True),  # over the limit: it could not be drained cheaply
        ([(b"content-length", b"12x")], True),
        ([(b"transfer-encoding", b"chunked")], True),  # no length: it could go on for ever
        ([], False),  # no body at all
    ],
)
def test_a_refusal_closes_the_connection_only_when_the_unread_body_is_unbounded(headers, closes):
    app = App(held=True)
    admission = door(app, capacity=1)

    async def scenario():
        first = Exchange()
        task = asyncio.create_task(admission(first.scope, first.receive, first.send))
        await until(lambda: app.entered == 1)
        refused = Exchange(headers=headers)
        await admission(refused.scope, refused.receive, refused.send)
        not_ready = door(App(), not_serving="loading")
        again = Exchange(headers=headers)
        await not_ready(again.scope, again.receive, again.send)
        app.release.set()
        await task
        return refused, again

    refused, again = run(scenario)
    for exchange in (refused, again):
        assert exchange.status == 503
        assert (exchange.headers.get(b"connection") == b"close") is closes


def test_while_the_model_loads_a_request_is_refused_503_not_ready_with_the_reason():
    app = App()
    admission = door(app, not_serving="model shapes is loading")

    async def scenario():
        exchange = Exchange()
        await admission(exchange.scope, exchange.receive, exchange.send)
        return exchange

    exchange = run(scenario)
    assert (exchange.status, exchange.reads, app.entered) == (503, 0, 0)
    assert exchange.json["error"]["message"] == "model shapes is loading"
    assert exchange.json["error"]["code"] == "not_ready"
    assert counted(admission, 503) == 1


@pytest.mark.parametrize("path", ["/v1/classify", "/healthz"])
def test_headers_over_the_limit_are_431_on_every_path_and_at_the_limit_pass(path):
    app = App()
    admission = door(app)
    name = b"x-padding"

    async def scenario():
        over = Exchange(path, headers=[(name, b"p" * (MAX_HEADER_BYTES - len(name) + 1))])
        at = Exchange(path, headers=[(name, b"p" * (MAX_HEADER_BYTES - len(name)))])
        for exchange in (over, at):
            await admission(exchange.scope, exchange.receive, exchange.send)
        return over, at

    over, at = run(scenario)
    assert (over.status, over.reads) == (431, 0)
    assert f"{MAX_HEADER_BYTES:,} bytes" in json.dumps(over.json)
    assert at.status == 200
    assert app.entered == 1
    assert counted(admission, 431) == (1 if path == "/v1/classify" else 0)  # only inference requests are counted


def test_other_paths_and_other_scopes_pass_through_whatever_the_capacity():
    app = App(held=True)
    admission = door(app, capacity=1, not_serving="loading")

    async def scenario():
        app.release.set()
        health = Exchange("/healthz")
        await admission(health.scope, health.receive, health.send)
        lifespan = {"type": "lifespan"}
        await admission(lifespan, health.receive, health.send)
        return health

    health = run(scenario)
    assert health.status == 200
    assert [scope["type"] for scope in app.seen] == ["http", "lifespan"]
    assert deadline_of(app.seen[0]) is None  # no deadline outside the inference paths
    assert counted(admission, 200) == 0  # not an inference request


def test_a_body_that_never_comes_is_408_and_closes_and_a_late_answer_is_504_and_keeps_it():
    admission = door(App(held=True), timeout_s=0.05)

    async def scenario():
        no_body = Exchange(body=None)
        await admission(no_body.scope, no_body.receive, no_body.send)
        late = Exchange()
        await admission(late.scope, late.receive, late.send)
        return no_body, late

    no_body, late = run(scenario)
    assert (no_body.status, no_body.headers.get(b"connection")) == (408, b"close")
    assert no_body.json["error"]["message"] == "the request body did not arrive within 0.05 s"
    assert (late.status, late.headers.get(b"connection")) == (504, None)
    assert late.json["error"]["message"] == "no answer within the request deadline of 0.05 s"
    assert (rejected(admission, "body_timeout"), rejected(admission, "deadline")) == (1, 1)
    assert (counted(admission, 408), counted(admission, 504)) == (1, 1)
    assert inflight(admission) == 0


def test_an_answer_already_started_at_the_deadline_gets_nothing_more():
    admission = door(App(held=True, answer_after_body=False), timeout_s=0.05)

    async def scenario():
        exchange = Exchange()
        await admission(exchange.scope, exchange.receive, exchange.send)
        return exchange

    exchange = run(scenario)
    assert [m["type"] for m in exchange.sent] == ["http.response.start"]
    assert counted(admission, 200) == 1
    assert rejected(admission, "deadline") == 0


def test_an_app_that_dies_before_answering_is_counted_as_a_500():
    admission = door(App(fail=True))

    async def scenario():
        exchange = Exchange()
        with pytest.raises(RuntimeError, match="the app died"):
            await admission(exchange.scope, exchange.receive, exchange.send)

    run(scenario)
    assert counted(admission, 500) == 1
    assert (inflight(admission), admission.admitted) == (0.0, 0)


def test_the_requests_key_name_labels_its_count_and_rides_in_the_scope():
    class Access:
        keys_required = True

        @staticmethod
        def key_name(authorization):
            return {b"Bearer k1": "team-a"}.get(authorization)

    app = App()
    admission = door(app, access=Access())

    async def scenario():
        for authorization in (b"Bearer k1", b"Bearer nope"):
            exchange = Exchange(headers=[(b"authorization", authorization), (b"content-length", b"2")])
            await admission(exchange.scope, exchange.receive, exchange.send)

    run(scenario)
    assert (counted(admission, 200, key="team-a"), counted(admission, 200)) == (1, 1)
    assert [scope.get("dynfuse.key_name") for scope in app.seen] == ["team-a", None]


def test_refusals_are_paced_one_per_interval_and_held_no_longer_than_the_maximum():
    admission = door(App(), refusals_per_s=4, max_refusal_hold_s=0.6)

    async def delays():
        loop = asyncio.get_running_loop()
        now = loop.time()
        loop.time = lambda: now  # a stopped clock: the pace is computed, not timed
        try:
            return [admission._refusal_delay() for _ in range(5)]
        finally:
            del loop.time

    assert asyncio.run(delays()) == pytest.approx([0.0, 0.25, 0.5, 0.6, 0.6], abs=1e-9)
