"""Properties of the request path that the benchmarks depend on, and a client that walks away."""

from __future__ import annotations

import asyncio
import inspect

import service.api.deps as deps
from export.backends import OnnxRuntimeBackend
from service.config import Settings
from service.main import create_app


def test_dependencies_run_on_the_event_loop_not_in_the_thread_pool():
    # FastAPI sends a plain `def` dependency through its thread pool: three hops per request were the
    # largest cost of the HTTP path under load.
    for name in ("get_app_settings", "get_service", "require_api_key"):
        assert inspect.iscoroutinefunction(getattr(deps, name)), name


def test_onnx_runtime_threads_do_not_spin_between_runs():
    options = OnnxRuntimeBackend("cpu").options
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_a_client_that_disconnects_mid_body_is_a_499_not_a_500(tiny_store):
    async def scenario():
        app = create_app(Settings(store=tiny_store))
        async with app.router.lifespan_context(app):
            for _ in range(600):
                if app.state.service is not None:
                    break
                await asyncio.sleep(0.05)
            messages = iter([{"type": "http.request", "body": b'{"text": "a re', "more_body": True}])

            async def receive():
                return next(messages, {"type": "http.disconnect"})

            sent = []

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "path": "/v1/classify",
                "raw_path": b"/v1/classify",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"host", b"dynfuse")],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "scheme": "http",
            }
            await app(scope, receive, send)
            return sent, app.state.metrics.registry

    sent, registry = asyncio.run(scenario())
    assert sent[0]["status"] == 499
    by_status = {"model": "shapes", "protocol": "http", "key": "anonymous"}
    assert registry.get_sample_value("dynfuse_requests_total", {**by_status, "status": "499"}) == 1
    assert registry.get_sample_value("dynfuse_requests_total", {**by_status, "status": "500"}) == 0
    reason = {"model": "shapes", "reason": "client_disconnect"}
    assert registry.get_sample_value("dynfuse_rejected_requests_total", reason) == 1
