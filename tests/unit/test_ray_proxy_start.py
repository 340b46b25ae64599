"""``dynfuse serve --engine ray`` waits for Serve's HTTP proxy past Ray's own 60 s (service/ray/run.py's
``start_serve``): when ``serve.start`` gives up on a proxy that is still starting (a busy 2-core machine), the
command connects to the controller again and waits for the proxy's port itself, up to DYNFUSE_RAY_PROXY_TIMEOUT_S;
past that it stops with a message naming the variable. ``serve.start`` is replaced here by what Ray's does on
such a machine (raise its TimeoutError after 60 s, or ActorDiedError when the controller killed the proxy it
waited on, and the proxy comes up later); the proxy is a real HTTP server on loopback. The controller is given
the same time for its ready check of a starting proxy.
The real proxy is started by tests/e2e/test_ray_cli.py and tests/integration/test_ray_engine.py."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from conftest import free_port

from service.config import Settings
from service.ray.run import Refused, start_serve


class Proxy(http.server.BaseHTTPRequestHandler):
    """What Serve's proxy answers before an application's routes reach it."""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        ok = self.path == "/-/healthz"
        self.send_response(503 if ok else 404)
        self.end_headers()
        self.wfile.write(b"Route table is not populated yet." if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_serve(monkeypatch):
    """Ray's serve.start as it behaves when the proxy is slow: the first call raises ``fake.error`` (Ray's
    TimeoutError unless a test sets another; after ``proxy_up_after`` seconds the proxy listens), later calls
    connect to the running controller. ``calls``: each call's options."""
    from ray import serve

    calls = []
    servers = []

    def start(http_options, logging_config, controller_options=None):
        calls.append({"http_options": http_options, "controller_options": controller_options})
        if len(calls) == 1:
            port = http_options["port"]

            def open_later():
                time.sleep(fake_serve.proxy_up_after)
                server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Proxy)
                servers.append(server)
                server.serve_forever(poll_interval=0.05)

            if fake_serve.proxy_up_after is not None:
                threading.Thread(target=open_later, daemon=True).start()
            raise fake_serve.error

    fake_serve.proxy_up_after = 0.5
    fake_serve.error = TimeoutError("HTTP proxies not available after 60s.")
    monkeypatch.setattr(serve, "start", start)
    yield fake_serve, calls
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_proxy_slower_than_ray_s_own_limit_is_waited_for(fake_serve):
    fake, calls = fake_serve
    fake.proxy_up_after = 1.0
    port = free_port()
    started = time.monotonic()
    assert start_serve({"host": "127.0.0.1", "port": port}, timeout_s=60) is True
    assert 1.0 <= time.monotonic() - started < 30
    assert len(calls) == 2, "serve.start was not called again to connect to the controller"


def test_a_proxy_the_controller_killed_while_it_started_is_waited_for(fake_serve):
    from ray.exceptions import ActorDiedError

    fake, calls = fake_serve
    fake.error = ActorDiedError()  # what serve.start raises when the controller gave up on the proxy it waited on
    assert start_serve({"host": "127.0.0.1", "port": free_port()}, timeout_s=60) is True
    assert len(calls) == 2, "serve.start was not called again to connect to the controller"


def test_the_controller_gives_a_starting_proxy_the_start_s_time(fake_serve, monkeypatch):
    fake, calls = fake_serve
    monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
    start_serve({"host": "127.0.0.1", "port": free_port()}, timeout_s=75)
    variables = calls[0]["controller_options"]["runtime_env"]["env_vars"]
    assert variables == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "75"}


def test_a_ready_check_time_the_user_set_for_ray_is_kept(fake_serve, monkeypatch):
    fake, calls = fake_serve
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "12.5")
    start_serve({"host": "127.0.0.1", "port": free_port()}, timeout_s=75)
    variables = calls[0]["controller_options"]["runtime_env"]["env_vars"]
    assert variables == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "12.5"}


def test_a_proxy_that_never_answers_stops_the_start_naming_the_setting(fake_serve):
    fake, _ = fake_serve
    fake.proxy_up_after = None  # nothing ever listens
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        start_serve({"host": "127.0.0.1", "port": free_port()}, timeout_s=2.0)
    assert 2.0 <= time.monotonic() - started < 20
    message = str(refused.value)
    assert "Ray Serve's HTTP proxy did not start within 2 s" in message
    assert "DYNFUSE_RAY_PROXY_TIMEOUT_S" in message


def test_a_stop_ends_the_wait_at_once(fake_serve):
    fake, _ = fake_serve
    fake.proxy_up_after = None
    stop_at = time.monotonic() + 0.5
    started = time.monotonic()
    assert (
        start_serve({"host": "127.0.0.1", "port": free_port()}, 60, stopping=lambda: time.monotonic() > stop_at)
        is False
    )
    assert time.monotonic() - started < 10


def test_the_setting_has_a_default_past_ray_s_own_60_s_and_a_bad_value_is_refused(monkeypatch):
    assert Settings().ray_proxy_timeout_s == 300
    monkeypatch.setenv("DYNFUSE_RAY_PROXY_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="ray_proxy_timeout_s"):
        Settings()
    monkeypatch.setenv("DYNFUSE_RAY_PROXY_TIMEOUT_S", "600")
    assert Settings().ray_proxy_timeout_s == 600
