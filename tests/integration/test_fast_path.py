"""POST /v1/classify's fast path (service/api/fast_path.py) answers exactly what FastAPI's route answers: the same
status, body, headers and metrics for good requests and for every kind of bad one, with and without an API key."""

from __future__ import annotations

import pytest
from conftest import b64, scrape
from test_api_errors import bad_requests

VOLATILE = ("id", "timing_ms")  # a fresh request id and the timings differ from one answer to the next
HEADERS = ("content-type", "retry-after", "www-authenticate", "connection", "x-request-id")
LIMITS = {"max_body_bytes": 64 * 1024, "max_image_pixels": 256 * 256, "max_text_chars": 200, "max_batch_inputs": 4}


def pair(serve, **settings):
    """Two apps on the same store and settings: one with the fast path (as served), one without it."""
    fast, slow = serve(**settings), serve(**settings)
    slow.app.fast_path = None
    calls = []
    inner = fast.app.fast_path.limited

    async def counted(scope, receive, send):
        calls.append(scope["path"])
        await inner(scope, receive, send)

    fast.app.fast_path.limited = counted
    return fast, slow, calls


def answer(response) -> tuple:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in VOLATILE}
    return response.status_code, body, {h: response.headers.get(h) for h in HEADERS if h != "x-request-id"}


def good_requests(samples, experts) -> list[tuple[str, dict]]:
    sample = samples[0]
    pair_json = {"image": b64(sample["png"]), "text": sample["text"]}
    return [
        ("auto", {"json": pair_json}),
        ("text only", {"json": {"text": sample["text"]}}),
        ("image only", {"json": {"image": b64(sample["png"])}}),
        ("threshold", {"json": pair_json | {"threshold": 0.9}}),
        ("soft", {"json": pair_json | {"route": "soft"}}),
        ("confidence floor", {"json": pair_json | {"min_confidence": 0.99}}),
        *((f"forced {e}", {"json": pair_json | {"route": e}}) for e in experts),
        ("multipart", {"files": {"image": ("a.png", sample["png"])}, "data": {"text": sample["text"]}}),
        ("form, text only", {"data": {"text": sample["text"]}}),
        ("data URL", {"json": {"image": "data:image/png;base64," + b64(sample["png"]), "text": sample["text"]}}),
        ("the default model by name", {"json": pair_json | {"model": "shapes"}}),
        ("unknown model", {"json": pair_json | {"model": "nope"}}),
        ("request id supplied", {"json": pair_json, "headers": {"X-Request-ID": "abc-123"}}),
    ]


def test_fast_path_answers_as_fastapi_does(serve, samples):
    fast, slow, calls = pair(serve, **LIMITS)
    experts = [e["name"] for e in fast.get("/v1/models/shapes").json()["experts"]]
    requests = good_requests(samples, experts) + [(n, r) for n, r, _, _ in bad_requests(samples[0]["png"])]
    statuses = set()
    for name, request in requests:
        fast_answer, slow_answer = fast.post("/v1/classify", **request), slow.post("/v1/classify", **request)
        assert answer(fast_answer) == answer(slow_answer), name
        if "X-Request-ID" in request.get("headers", {}):
            assert fast_answer.headers["x-request-id"] == slow_answer.headers["x-request-id"] == "abc-123"
        statuses.add(fast_answer.status_code)
    assert statuses >= {200, 400, 404, 413, 415, 422}, statuses
    assert len(calls) == len(requests), "every POST /v1/classify went through the fast path"

    # the same metrics: requests by status, refusals by reason, routes taken
    def counted(client):
        names = ("dynfuse_requests_total", "dynfuse_rejected_requests_total", "dynfuse_route_decisions_total")
        return {key: v for key, v in scrape(client).items() if key[0] in names}

    assert counted(fast) == counted(slow)
    assert sum(v for (name, _), v in counted(fast).items() if name == "dynfuse_requests_total") == len(requests)


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic secret"}, 401),
     ({"Authorization": "Bearer secret"}, 200)],
)  # fmt: skip
def test_fast_path_checks_the_api_key(serve, samples, headers, status):
    fast, slow, calls = pair(serve, api_key="secret")
    request = {"json": {"image": b64(samples[0]["png"]), "text": samples[0]["text"]}, "headers": headers}
    fast_answer, slow_answer = fast.post("/v1/classify", **request), slow.post("/v1/classify", **request)
    assert fast_answer.status_code == status
    assert answer(fast_answer) == answer(slow_answer)
    assert calls == ["/v1/classify"]


def test_other_routes_and_methods_still_go_through_fastapi(serve, samples):
    fast, _, calls = pair(serve)
    assert fast.get("/v1/classify").status_code == 405
    redirected = fast.post("/v1/classify/", json={"text": "a red circle"}, follow_redirects=False)
    assert redirected.status_code == 307  # FastAPI's redirect to the path without the slash
    batch = fast.post("/v1/classify/batch", json={"inputs": [{"text": samples[0]["text"]}]})
    assert batch.status_code == 200
    assert calls == []
