"""``dynfuse build-default``: synthetic data -> training -> export, idempotent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from export.store import list_store, load_model


@pytest.mark.slow
def test_build_default_end_to_end_then_does_nothing_the_second_time(tmp_path):
    store, work = tmp_path / "store", tmp_path / "work"
    command = [sys.executable, "-m", "service.cli", "build-default", "--store", str(store), "--work", str(work),
               "--preset", "tiny", "--size", "480", "--quiet"]  # fmt: skip

    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert list_store(store) == {"shapes": ["1"]}
    model = load_model(store)
    assert model.expert_names == ("text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse")
    assert "1/3 synthetic benchmark" in first.stdout
    assert "3/3 exporting" in first.stdout

    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "already in" in second.stdout
    assert "nothing to build" in second.stdout
    assert list_store(store) == {"shapes": ["1"]}
