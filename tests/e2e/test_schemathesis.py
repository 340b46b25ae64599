"""schemathesis against a real ``dynfuse serve`` with every check on: the OpenAPI document says what the
server enforces, in both directions (valid requests are served, invalid ones refused), and no request
it can generate gets a 5xx.

The whole API, every phase (examples, coverage, fuzzing, stateful), against a server with the settings a user
gets by default: the model repository included. Model control is off by default (as Triton's), so no generated
request can unload the model: load and unload are 403, and the model is still served at the end.

Bounded: a fixed seed, 25 examples per operation and phase, no example database (so a run does not
depend on the last one), about 40 s on 2 cores. tests/e2e/st_hooks.py supplies what no JSON Schema
keyword can make a generator produce (real image files, /v2's cross-field rules) and nothing else.
One setting: this API refuses data over a limit (text length, rows) with 413, which is a refusal, so
negative_data_rejection accepts 413 besides its default list.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import require_tool

pytestmark = pytest.mark.e2e

CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


@pytest.mark.timeout(1200)  # st's own bound is 900 s; on a loaded 2-core machine the run and two workers' stop pass 300
def test_schemathesis_finds_no_failure_with_every_check(server_process, tmp_path):
    st = require_tool("st")
    process, base = server_process(log_level="warning", workers=0)  # every default: one worker per core too
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "st_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
        "DYNFUSE_OPENAPI_URL": f"{base}/openapi.json",
    }
    command = [st, "--config-file", str(config), "run", f"{base}/openapi.json", "--checks", "all"]
    command += ["--max-examples", "25", "--seed", "1", "--generation-database", "none", "--no-color"]
    command += ["--request-timeout", "30", "--phases", "examples,coverage,fuzzing,stateful"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", output).groups())
    assert generated == passed
    assert generated > 500, output[-3000:]  # every operation was exercised, not skipped
    paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    total = sum(len(methods) for methods in paths.values())
    assert f"{total} selected / {total} total" in output  # the whole API, the repository included
    assert "Stateful" in output  # the phase that follows links between operations ran
    assert process.poll() is None  # the server is still up
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200  # and still serves its model
    assert httpx.post(f"{base}/v1/classify", json={"text": "a red circle"}, timeout=30).status_code == 200
