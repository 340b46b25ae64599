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
