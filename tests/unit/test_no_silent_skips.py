"""A skip in CI is a failure, whatever causes it; ``CI`` is read as a boolean; outside CI the run ends by listing
each skip and what installs it. Run on the suite's own conftest.py, in a pytest of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SKIPPING = """
import pytest
from conftest import require_tool

def test_runs():
    assert True

def test_a_missing_tool():
    require_tool("no-such-tool-dynfuse")

def test_a_missing_module():
    pytest.importorskip("no_such_module_dynfuse")

@pytest.mark.skipif(True, reason="a condition")
def test_skipif():
    pass

@pytest.mark.xfail(reason="expected to fail", strict=True)
def test_an_expected_failure():
    assert False
"""

SKIPPED_MODULE = """
import pytest
pytest.importorskip("no_such_module_dynfuse")

def test_never_collected():
    pass
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skips")
    (root / "tests").mkdir()
    shutil.copy(TESTS / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "test_skipping.py").write_text(SKIPPING)
    (root / "tests" / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    return root


def run_pytest(project: Path, ci: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-rA", *args]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)


# make test's first step: the tests run in pytest-xdist's workers, and their reports reach the controller.
XDIST = ("-n", "2", "--dist", "loadfile")


@pytest.mark.parametrize(
    ("value", "is_ci"),
    [(None, False), ("", False), ("false", False), ("0", False), ("no", False), ("False", False), (" off ", False),
     ("true", True), ("1", True), ("yes", True), ("woodpecker", True)],
)  # fmt: skip
def test_ci_is_read_as_a_boolean(monkeypatch, value, is_ci):
    from conftest import in_ci

    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is is_ci


def test_under_ci_every_skip_is_a_failure_and_a_module_level_one_a_collection_error(project):
    result = run_pytest(project, "true", "tests")

    assert result.returncode == 2, result.stdout  # interrupted: the skipped module is a collection error
    assert "Interrupted: 1 error during collection" in result.stdout, result.stdout
    assert "skipped under CI" in result.stdout
    alone = run_pytest(project, "true", "tests/test_skipping.py")
    assert alone.returncode == 1, alone.stdout
    # The skipif is refused at setup (an error), the two skips inside tests are failures; the xfail stays one.
    assert alone.stdout.strip().splitlines()[-1].startswith("2 failed, 1 passed, 1 xfailed, 1 error"), alone.stdout
    for reason in ("no-such-tool-dynfuse is not installed", "no_such_module_dynfuse", "a condition"):
        assert f"skipped under CI, where every test must run (a skip there hides what users meet): {reason}" in (
            alone.stdout.replace("could not import 'no_such_module_dynfuse'", "no_such_module_dynfuse")
        ), reason


def test_outside_ci_skips_stay_skips_and_the_run_lists_them_with_what_installs_them(project):
    result = run_pytest(project, "false", "tests")

    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("1 passed, 4 skipped, 1 xfailed"), result.stdout
    listing = result.stdout[result.stdout.index("skipped here; CI runs them") :]
    assert "4 skipped, for these reasons:" in listing
    assert "no-such-tool-dynfuse is not installed; install it:" in listing
    assert "make test-tools" in listing


def test_under_ci_the_hooks_hold_in_xdist_workers_as_make_test_runs_them(project):
    result = run_pytest(project, "true", *XDIST, "tests")

    assert result.returncode == 1, result.stdout
    # Each skip, the module-level one included, reaches the controller as a failure or an error; nothing is skipped.
    assert result.stdout.strip().splitlines()[-1].startswith("2 failed, 1 passed, 1 xfailed, 2 errors"), result.stdout
    for reason in ("no-such-tool-dynfuse is not installed", "no_such_module_dynfuse", "a condition"):
        assert f"skipped under CI, where every test must run (a skip there hides what users meet): {reason}" in (
            result.stdout.replace("could not import 'no_such_module_dynfuse'", "no_such_module_dynfuse")
        ), reason


def test_outside_ci_the_controller_lists_the_skips_of_xdist_workers(project):
    result = run_pytest(project, "false", *XDIST, "tests")

    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("1 passed, 4 skipped, 1 xfailed"), result.stdout
    listing = result.stdout[result.stdout.index("skipped here; CI runs them") :]
    assert "4 skipped, for these reasons:" in listing
    assert "no-such-tool-dynfuse is not installed; install it:" in listing
