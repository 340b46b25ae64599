"""A setting the server cannot serve with stops ``dynfuse serve`` before it binds a port, with a message that
names the environment variable (what the user set), never a pydantic field."""

from __future__ import annotations

import os

import pytest

from service import cli


@pytest.fixture
def clean_env(monkeypatch):
    for name in [name for name in os.environ if name.startswith("DYNFUSE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({"DYNFUSE_MAX_QUEUE": "abc"}, [], "DYNFUSE_MAX_QUEUE='abc': Input should be a valid integer"),
        ({"DYNFUSE_MAX_BATCH_SIZE": "0"}, [], "DYNFUSE_MAX_BATCH_SIZE='0': Input should be greater than or equal"),
        ({"DYNFUSE_MODEL_CONTROL": "sometimes"}, [], "DYNFUSE_MODEL_CONTROL='sometimes': Input should be 'none'"),
        ({"DYNFUSE_OPERATING_POINT": "lambda_9"}, [], "DYNFUSE_OPERATING_POINT='lambda_9' is not an operating point"),
        ({"DYNFUSE_DEGRADE_TO": "cheapest"}, [], "DYNFUSE_DEGRADE_TO='cheapest' is not an operating point"),
        ({"DYNFUSE_MODEL_CONTROL": "explicit"}, ["--host", "0.0.0.0"], "without DYNFUSE_ADMIN_KEY"),
        ({"DYNFUSE_API_KEYS_FILE": "/nonexistent/keys"}, [], "DYNFUSE_API_KEYS_FILE=/nonexistent/keys: cannot read"),
        ({"DYNFUSE_STORE_POLL_S": "5"}, [], "DYNFUSE_STORE_POLL_S is set but DYNFUSE_MODEL_CONTROL=none"),
    ],
)
def test_a_bad_setting_stops_serve_naming_the_variable(clean_env, tiny_store, capsys, env, flags, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert cli.main(["serve", "--store", str(tiny_store), "--port", "0", *flags]) == 1
    error = capsys.readouterr().err
    assert expected in error
    assert "validation error" not in error  # pydantic's own wording, which names fields, not variables
    assert "\n" not in error.strip()  # one line


def test_a_secret_is_never_echoed(clean_env, tiny_store, capsys):
    clean_env.setenv("DYNFUSE_ADMIN_KEY", "hunter2-admin")
    clean_env.setenv("DYNFUSE_MAX_QUEUE", "abc")
    assert cli.main(["serve", "--store", str(tiny_store), "--port", "0"]) == 1
    assert "hunter2" not in capsys.readouterr().err
