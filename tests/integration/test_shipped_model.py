"""The default model the repository ships (store/shapes/1): verified like any store, and never out of date.

When the code that trains or exports the default model changes, the shipped files must be rebuilt from it:
``make ship-default`` rebuilds them, then ``make figures`` (which it runs) updates every documented figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from export import provenance
from export.default_model import SHIPPED_STORE, SHIPPED_VERSION, build_config, describe_build
from export.store import list_store, load_model

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / SHIPPED_STORE
REBUILD = "make ship-default (it rebuilds store/shapes/1 and regenerates the figures; commit store/, docs/, bench/)"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((STORE / "shapes" / SHIPPED_VERSION / "model.json").read_text())


def test_the_shipped_model_was_built_from_the_code_and_configuration_of_this_checkout(shipped):
    recorded = shipped["provenance"]["training_inputs"]
    current = provenance.training_inputs(describe_build(*build_config()))
    changes = provenance.changed_inputs(recorded, current)
    assert current["digest"] == recorded["digest"], (
        "store/shapes/1 was built from other training inputs than this checkout's:\n  "
        + "\n  ".join(changes or ["(the digests differ)"])
        + f"\nRebuild and re-ship it: {REBUILD}"
    )


def test_the_shipped_model_loads_verified_and_records_how_it_was_built(shipped):
    assert list_store(STORE)["shapes"][0] == SHIPPED_VERSION
    model = load_model(STORE, "shapes", SHIPPED_VERSION)  # every sha256, and the provenance's own digest
    record = model.manifest["provenance"]
    assert record["command"].startswith("dynfuse build-default ")
    synth, train = build_config()
    assert record["data"]["seed"] == synth.seed == train.seed
    assert record["data"]["size"] == synth.size
    # ONNX only: the repository stays small, and serving needs nothing else.
    assert {fmt for component in model.components.values() for fmt in component.files} == {"onnx"}
    assert not list((STORE / "shapes" / SHIPPED_VERSION).glob("*.pt"))


def test_the_recorded_commit_is_in_this_repositorys_history(shipped):
    commit = shipped["provenance"]["commit"]
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if shallow == "true":  # a CI clone of depth 1 holds no history to look in; the digest test still runs
        assert len(commit) == 40
        return
    found = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT, capture_output=True)
    assert found.returncode == 0, f"the commit that built store/shapes/1, {commit}, is not an ancestor of HEAD"


def test_the_shipped_files_are_tracked_by_git():
    tracked = subprocess.run(
        ["git", "ls-files", "--", f"{SHIPPED_STORE}/shapes/{SHIPPED_VERSION}"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    manifest = json.loads((STORE / "shapes" / SHIPPED_VERSION / "model.json").read_text())
    listed = {entry["file"] for c in manifest["components"].values() for entry in c["files"].values()}
    listed |= {example["file"] for example in manifest["examples"]} | {"model.json", "tokenizer.json"}
    assert {f"{SHIPPED_STORE}/shapes/{SHIPPED_VERSION}/{name}" for name in listed} <= set(tracked)


def _planned(target: str) -> str:
    """What ``make TARGET`` would run, as a user's shell sees it: under ``make test`` the environment carries
    the outer make's MAKEFLAGS and MAKELEVEL, which would make this one print its "Entering directory" lines."""
    make = shutil.which("make")
    assert make, "make is what users run"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    command = [make, "--no-print-directory", "-n", "-B", target]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def test_make_run_installs_the_serving_core_only_and_serves_the_shipped_store():
    planned = _planned("run")
    assert "pip install --quiet -e .\n" in planned  # the serving core: no extra, no torch
    assert "torch" not in planned
    assert "build-default" not in planned
    assert planned.rstrip().endswith("dynfuse serve --store store --host 127.0.0.1 --port 8000")


def test_make_ship_default_rebuilds_from_scratch_and_replaces_the_shipped_version():
    planned = _planned("ship-default")
    setup = ("python3 -m venv", ".venv/bin/pip", "touch")
    steps = [line for line in planned.splitlines() if not line.startswith(setup)]
    assert steps[:5] == [
        "rm -rf build/ship-store build/ship-work",
        "OMP_NUM_THREADS=1 .venv/bin/dynfuse build-default --store build/ship-store --work build/ship-work "
        "--formats onnx",
        f"rm -rf store/shapes/{SHIPPED_VERSION}",
        "mkdir -p store/shapes",
        f"cp -R build/ship-store/shapes/{SHIPPED_VERSION} store/shapes/{SHIPPED_VERSION}",
    ]
    assert "figures" in steps[5]  # then every figure and example output from the new files
