"""Soak and chaos in CI, bounded to about two minutes: bench/soak.py's mixed traffic (good, bad, fuzzed,
oversized, disconnecting and stalled clients, batch and /v2) against ``dynfuse serve --workers 2`` on the
tiny model, then one worker killed under load. ``python -m bench.soak`` runs the same for 10 minutes."""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = pytest.mark.e2e


def test_soak_then_kill_a_worker_under_load(tiny_store, samples, tmp_path):
    result = soak.run(
        tiny_store, samples[:100], soak_s=60, warmup_s=15, chaos_s=20, log=tmp_path / "server.log", progress=print
    )
    record = tmp_path / "soak.json"
    record.write_text(json.dumps(result, indent=1))  # the whole record, for when an assertion fails
    verdict, phase, chaos = result["verdict"], result["soak"], result["chaos"]
    failed = [check for check, passed in verdict.items() if not passed]
    assert verdict["passed"], f"{failed} failed; see {record}: {json.dumps(result['resources'])}"
    assert phase["server_errors_5xx"] == chaos["server_errors_5xx"] == 0
    assert phase["by_status"].get("200", 0) > 300  # it served, not just refused
    assert {"400", "408", "413", "415", "422"} <= set(phase["by_status"])  # the bad traffic reached its checks
    for row in result["resources"]["processes"].values():
        assert row["rss_growth"] < 0.10, row
        assert row["fds_added"] <= 0, row
        assert row["threads_added"] <= soak.THREAD_SLACK, row
    assert chaos["replaced"], chaos
    assert chaos["survivor_kept_serving"], chaos
    assert result["exit_code"] == 0
