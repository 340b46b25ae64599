"""``dynfuse build-default``: synthetic data -> training -> export, idempotent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from export import provenance
from export.default_model import build_config, describe_build
from export.store import list_store, load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_build_default_end_to_end_then_does_nothing_the_second_time(tmp_path):
    store, work = tmp_path / "store", tmp_path / "work"
    # ONNX only, as `make ship-default` builds the shipped model (and half the export's time).
    command = [sys.executable, "-m", "service.cli", "build-default", "--store", str(store), "--work", str(work),
               "--preset", "tiny", "--size", "480", "--formats", "onnx", "--quiet"]  # fmt: skip

    first = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr
    assert list_store(store) == {"shapes": ["1"]}
    model = load_model(store)  # verified: every sha256 and the provenance's digest
    assert model.expert_names == ("text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse")
    assert {fmt for component in model.components.values() for fmt in component.files} == {"onnx"}
    assert "1/3 synthetic benchmark" in first.stdout
    assert "3/3 exporting" in first.stdout

    # How it was built, in model.json: the command, the data and its seed, the commit, the training inputs.
    record = model.manifest["provenance"]
    assert record["command"] == "dynfuse " + " ".join(command[command.index("build-default") :])
    assert (record["data"]["seed"], record["data"]["size"], record["data"]["image_size"]) == (0, 480, 32)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert record["commit"] == head
    build = describe_build(*build_config("tiny", 480, 0))
    assert record["training_inputs"] == provenance.training_inputs(build)

    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "already in" in second.stdout
    assert "nothing to build" in second.stdout
    assert list_store(store) == {"shapes": ["1"]}
