"""DYNFUSE_GRPC_PORT: off unless set, blank is off (over the image's 8001), and the ports that cannot work are
refused at start naming the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.grpc.server import address


def test_grpc_is_off_unless_set_and_blank_turns_it_off(monkeypatch):
    monkeypatch.delenv("DYNFUSE_GRPC_PORT", raising=False)
    assert Settings().grpc_port is None
    monkeypatch.setenv("DYNFUSE_GRPC_PORT", "8001")
    assert Settings().grpc_port == 8001
    monkeypatch.setenv("DYNFUSE_GRPC_PORT", " ")
    assert Settings().grpc_port is None


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"port": 9000, "grpc_port": 9000}, "DYNFUSE_GRPC_PORT (9000) is the HTTP port"),
        ({"grpc_port": 0, "workers": 2}, "DYNFUSE_GRPC_PORT=0"),
        ({"grpc_port": 70000}, "less than or equal to 65535"),
        ({"grpc_port": "eight"}, "valid integer"),
    ],
)
def test_a_port_that_cannot_work_is_refused_with_the_variable(settings, says):
    with pytest.raises(ValidationError) as refused:
        Settings(**settings)
    assert says in str(refused.value)


def test_the_listening_address_brackets_ipv6_hosts():
    assert address("0.0.0.0", 8001) == "0.0.0.0:8001"
    assert address("::", 8001) == "[::]:8001"
    assert address("[::1]", 8001) == "[::1]:8001"


def _served(monkeypatch, tmp_path):
    """``serve`` with nothing started: what it started, by kind."""
    import os

    from service import server

    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "shapes" / "1").mkdir(parents=True)
    (tmp_path / "shapes" / "1" / "model.json").write_text("{}")
    started = {}
    monkeypatch.setattr(server, "_serve_workers", lambda settings: started.setdefault("workers", settings) and 0)
    monkeypatch.setattr(server.uvicorn.Server, "run", lambda self: started.setdefault("one process", True))
    monkeypatch.setattr(server, "tune_for_serving", lambda: None)
    monkeypatch.setattr(server.signal, "signal", lambda *args: None)
    return server, started


def test_any_free_port_with_the_default_workers_is_refused_where_that_is_several_processes(
    monkeypatch, tmp_path, capsys
):
    """Workers 0 (the default) is one per core: on 3 cores that is 3 processes, which 'any free port' cannot give
    one gRPC port; on one core it is one process, which can."""
    server, started = _served(monkeypatch, tmp_path)
    monkeypatch.setattr(server, "available_cores", lambda: 3)
    assert server.serve(Settings(store=tmp_path, grpc_port=0)) == 1
    assert "DYNFUSE_GRPC_PORT=0" in capsys.readouterr().err
    assert started == {}
    monkeypatch.setattr(server, "available_cores", lambda: 1)
    assert server.serve(Settings(store=tmp_path, grpc_port=0)) == 0
    assert started == {"one process": True}


def test_the_grpc_port_is_shared_unless_the_server_is_one_process():
    """SO_REUSEPORT lets each worker bind the one port; workers 0 (one per core) counts as several."""
    from types import SimpleNamespace

    from service.grpc.server import GrpcServer

    def reuseport(workers: int) -> int:
        app = SimpleNamespace(state=SimpleNamespace(settings=Settings(grpc_port=8001, workers=workers)))
        return dict(GrpcServer(app).options)["grpc.so_reuseport"]

    assert (reuseport(0), reuseport(2), reuseport(1)) == (1, 1, 0)
