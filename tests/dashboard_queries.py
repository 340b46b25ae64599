"""The Grafana dashboard's PromQL, for tests that check it (tests/unit/test_ops_files.py) or run it
against a real Prometheus (an integration test).

Import it as ``import dashboard_queries`` (pytest puts tests/, where conftest.py lives, on sys.path)::

    for title, expr in dashboard_queries.dashboard_queries():
        promql = dashboard_queries.render_expr(expr, model="shapes")
        ...  # GET /api/v1/query?query=<promql>

Every query is written to be evaluated verbatim through Prometheus's HTTP API once ``$model`` is
replaced: fixed ``[1m]``/``[5m]``/``[15m]`` windows, no Grafana-only variables such as ``$__rate_interval``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "dynfuse.json"

# The metrics contract (DESIGN.md, "Metrics"): name -> type.
CONTRACT_METRICS: dict[str, str] = {
    "dynfuse_requests_total": "counter",
    "dynfuse_route_decisions_total": "counter",
    "dynfuse_compute_madds_total": "counter",
    "dynfuse_compute_full_madds_total": "counter",
    "dynfuse_modality_importance": "histogram",
    "dynfuse_modality_weight": "histogram",
    "dynfuse_request_duration_seconds": "histogram",
    "dynfuse_queue_duration_seconds": "histogram",
    "dynfuse_expert_duration_seconds": "histogram",
    "dynfuse_batch_size": "histogram",
    "dynfuse_inflight_requests": "gauge",
    "dynfuse_rejected_requests_total": "counter",
    "dynfuse_model_info": "gauge",
    "dynfuse_operating_point_requests_total": "counter",
    "dynfuse_degraded_requests_total": "counter",
    "dynfuse_degraded_seconds_total": "counter",
    "dynfuse_audits_total": "counter",
    "dynfuse_audit_madds_total": "counter",
    "dynfuse_validated_agreement": "gauge",
    "dynfuse_route_mix_drift": "gauge",
    "dynfuse_guard_changes_total": "counter",
    "dynfuse_guard_active": "gauge",
    "dynfuse_uncertain_requests_total": "counter",
    "dynfuse_top_probability": "histogram",
}

# Series names a query may use: counters and gauges as they are, histograms by their series.
ALLOWED_SERIES: frozenset[str] = frozenset(
    series
    for name, kind in CONTRACT_METRICS.items()
    for series in ((f"{name}_bucket", f"{name}_sum", f"{name}_count") if kind == "histogram" else (name,))
)

_METRIC_RE = re.compile(r"\bdynfuse_[a-z_]+")
_MODEL_VAR_RE = re.compile(r"\$\{model(?::[a-z]+)?\}|\$model\b")


def load_dashboard(path: Path = DASHBOARD) -> dict:
    """The dashboard JSON as a dict."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows included, and the panels nested inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) for every target of every panel, in dashboard order."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(load_dashboard(path))
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def metric_names(expr: str) -> set[str]:
    """The dynfuse_* series an expression reads."""
    return set(_METRIC_RE.findall(expr))


def render_expr(expr: str, model: str = ".*") -> str:
    """The expression as Grafana would send it, ``$model`` replaced by ``model`` (a regex, as the
    variable is used in ``=~`` matchers; the default matches every model)."""
    return _MODEL_VAR_RE.sub(lambda _: model, expr)
