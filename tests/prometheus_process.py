"""A real Prometheus (Debian's ``prometheus``) on a free loopback port, for the e2e tests that scrape a real
``dynfuse serve``: its HTTP API as a small client, and a start function with the test's own config."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from conftest import free_port

TIMEOUT_S = 20  # Prometheus ready, one query's wait


class Prometheus:
    def __init__(self, base: str):
        self.base = base

    def query(self, promql: str) -> list[dict]:
        """The instant vector of ``promql`` evaluated now: [{"metric": {...}, "value": [t, "v"]}]."""
        response = httpx.get(f"{self.base}/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert response.status_code == 200, f"{promql}: {response.text}"
        assert body["status"] == "success", f"{promql}: {response.text}"
        assert body["data"]["resultType"] == "vector", f"{promql}: {body['data']['resultType']}"
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The one value of ``promql``, or None while it has none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, predicate, what: str, timeout: float = TIMEOUT_S) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.scalar(promql)
            if value is not None and predicate(value):
                return value
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout} s ({promql} = {self.scalar(promql)})")

    def wait_evaluated(self, after: float, what: str, timeout: float = 60.0) -> None:
        """Until every rule group has been evaluated at a time later than ``after`` (a Unix time): by Prometheus'
        own record of its evaluations (``lastEvaluation`` in /api/v1/rules), so a slow Prometheus is waited for."""
        deadline = time.monotonic() + timeout
        last: list[float] = []
        while time.monotonic() < deadline:
            groups = httpx.get(f"{self.base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            last = [unix_time(group["lastEvaluation"]) for group in groups]
            if last and min(last) > after:
                return
            time.sleep(0.1)
        raise AssertionError(f"{what}: the rules were not evaluated after {after} within {timeout} s (last: {last})")

    def alerts(self) -> dict[str, list[dict]]:
        """Alert name -> its active alerts (pending or firing), from /api/v1/alerts."""
        body = httpx.get(f"{self.base}/api/v1/alerts", timeout=5).json()
        assert body["status"] == "success", body
        active: dict[str, list[dict]] = {}
        for alert in body["data"]["alerts"]:
            active.setdefault(alert["labels"]["alertname"], []).append(alert)
        return active


def unix_time(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times (nanoseconds, ``Z``) as a Unix time; its zero time (never) as 0."""
    if rfc3339.startswith("0001-01-01"):
        return 0.0
    whole, _, fraction = rfc3339.removesuffix("Z").partition(".")
    stamp = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp()
    return stamp + (float(f"0.{fraction}") if fraction else 0.0)


def start_prometheus(binary: str, directory: Path, config: dict, started: list[subprocess.Popen]) -> Prometheus:
    """A ready Prometheus with ``config`` (written as JSON, which is YAML) in ``directory``; appended to
    ``started`` for the caller to stop (``stop``)."""
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started.append(process)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited {process.returncode}: {log_path.read_text()}")
        try:
            if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                return Prometheus(base)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus not ready in {TIMEOUT_S} s: {log_path.read_text()}")


def stop(started: list[subprocess.Popen]) -> None:
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
