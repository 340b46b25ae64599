"""``dynfuse plan``: the replicas each Ray deployment needs for a request rate, against a static full model.

The rate each expert deployment sees is the request rate times the expert's share of the route mix, which the
model measured on its test split (``model.json``: the ``auto`` policy of its evaluation) or ``--mix`` gives.
What one replica serves comes from ``bench/expert_throughput.py`` (one CPU, per batch size). With a latency
bound, each deployment batches only as much as keeps one batch within half of it (the other half is for the
ingress, the trips and the wait for a batch); without one, it uses the largest measured batch. A replica is
planned at ``utilization`` of what it can serve, so that a burst does not queue at once.

The static full model is the alternative the method is measured against: every request runs the full expert,
and the whole model is scaled as one block.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.store import resolve

DEFAULT_UTILIZATION = 0.7
LATENCY_SHARE_OF_ONE_BATCH = 0.5


class PlanError(ValueError):
    """The inputs cannot give a plan (no route mix, a missing expert, a bound no batch meets)."""


@dataclass
class Line:
    deployment: str
    share: float  # of the requests
    rate: float  # requests per second it sees
    batch_size: int
    per_replica: float  # requests per second one replica serves at that batch size
    replicas: int


def route_mix_of(store: Path, model: str | None, version: str | None = None) -> dict[str, float]:
    """The ``auto`` policy's route mix of the model's own evaluation (model.json)."""
    path = resolve(store, model, version)
    manifest = json.loads((path / "model.json").read_text())
    for policy in manifest.get("evaluation", {}).get("policies", []):
        if policy.get("policy") == "auto" and policy.get("route_mix"):
            return {k: float(v) for k, v in policy["route_mix"].items()}
    raise PlanError(f"{path / 'model.json'} has no measured route mix (evaluation.policies 'auto'); pass --mix")


def parse_mix(text: str) -> dict[str, float]:
    """``text=0.4,image=0.6`` -> shares, normalized to sum to 1."""
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        try:
            mix[name.strip()] = float(share)
        except ValueError:
            raise PlanError(f"--mix wants expert=share pairs, got {part!r}") from None
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise PlanError(f"--mix shares must be >= 0 and not all 0: {text}")
    return {k: v / total for k, v in mix.items()}


def best_batch(table: dict[str, dict], p99_ms: float | None, deployment: str) -> tuple[int, float]:
    """(batch size, requests/s of one replica): the fastest measured batch whose time fits the bound."""
    fitting = [
        (int(n), row["rows_per_s"])
        for n, row in table.items()
        if p99_ms is None or row["batch_ms"] <= LATENCY_SHARE_OF_ONE_BATCH * p99_ms
    ]
    if not fitting:
        fastest = min(row["batch_ms"] for row in table.values())
        raise PlanError(
            f"{deployment}: no measured batch runs within {LATENCY_SHARE_OF_ONE_BATCH:.0%} of {p99_ms} ms "
            f"(the fastest takes {fastest} ms); raise --p99-ms"
        )
    return max(fitting, key=lambda pair: pair[1])


def replicas_for(rate: float, per_replica: float, utilization: float) -> int:
    return max(1, math.ceil(rate / (per_replica * utilization)))


def experts_of(store: Path, model: str | None, version: str | None = None) -> list[str]:
    """The model's experts, in its router's order (model.json)."""
    path = resolve(store, model, version)
    return [expert["name"] for expert in json.loads((path / "model.json").read_text())["experts"]]


def check_measured(experts: list[str], throughput: dict, source: str) -> None:
    """Every expert to plan has a measurement in ``throughput`` (bench/expert_throughput.py's file, ``source``)."""
    measured = throughput.get("experts", {})
    missing = [expert for expert in experts if expert not in measured]
    if missing:
        which = ", ".join(repr(e) for e in missing)
        raise PlanError(
            f"no throughput measured for expert {which} in {source} (it measured {throughput.get('model')} "
            f"v{throughput.get('version')}: {', '.join(measured) or 'no expert'}); measure every expert of the "
            "model with: python -m bench.expert_throughput --store STORE --out FILE, then pass --throughput FILE"
        )


def make_plan(
    rps: float,
    mix: dict[str, float],
    throughput: dict,
    p99_ms: float | None,
    utilization: float,
    experts: list[str] | None = None,
) -> tuple[list[Line], Line]:
    """Lines for the ingress and each expert deployment (``experts``: the model's, by default the route mix's),
    and the static full model's."""
    experts = list(experts if experts is not None else mix)
    unknown = set(mix) - set(experts)
    if unknown:
        raise PlanError(f"the route mix names experts the model does not have: {sorted(unknown)}; it has {experts}")
    check_measured(experts, throughput, "the throughput file")
    lines = []
    batch, per_replica = best_batch(throughput["ingress"], p99_ms, "ingress")
    lines.append(Line("ingress", 1.0, rps, batch, per_replica, replicas_for(rps, per_replica, utilization)))
    for expert in experts:
        table = throughput["experts"][expert]
        share = mix.get(expert, 0.0)
        batch, per_replica = best_batch(table, p99_ms, expert)
        rate = rps * share
        lines.append(
            Line(f"expert_{expert}", share, rate, batch, per_replica, replicas_for(rate, per_replica, utilization))
        )
    batch, per_replica = best_batch(throughput["static_full"], p99_ms, "static full model")
    static = Line(
        f"static full ({throughput['full_expert']})", 1.0, rps, batch, per_replica,
        replicas_for(rps, per_replica, utilization),
    )  # fmt: skip
    return lines, static


def format_plan(lines: list[Line], static: Line, rps: float) -> str:
    header = f"{'deployment':<24}{'share':>8}{'req/s':>10}{'batch':>7}{'req/s/replica':>15}{'replicas':>10}"
    rows = [header]
    for line in [*lines, static]:
        if line is static:
            rows.append("-" * len(header))
        rows.append(
            f"{line.deployment:<24}{line.share:>8.1%}{line.rate:>10.0f}{line.batch_size:>7}"
            f"{line.per_replica:>15.0f}{line.replicas:>10}"
        )
    total = sum(line.replicas for line in lines)
    rows.append(
        f"at {rps:g} req/s: {total} replicas of 1 CPU for the routed deployments "
        f"(ingress {lines[0].replicas}, experts {total - lines[0].replicas}) against {static.replicas} for the "
        f"static full model"
    )
    return "\n".join(rows)


def serve_config(lines: list[Line], settings: dict[str, Any], port: int = 8000) -> dict:
    """A Serve config (``serve deploy``, a RayService's serveConfigV2) for the plan."""
    ingress, experts = lines[0], lines[1:]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [
            {
                "name": "dynfuse",
                "route_prefix": "/",
                "import_path": "service.ray.app:build",
                "args": {
                    "settings": settings,
                    "ingress": {"num_replicas": ingress.replicas, "num_cpus": 1},
                    "experts": {
                        line.deployment.removeprefix("expert_"): {
                            "num_replicas": line.replicas,
                            "num_cpus": 1,
                            "max_batch_size": line.batch_size,
                        }
                        for line in experts
                    },
                },
            }
        ],
    }


def write_serve_config(config: dict, path: Path, comment: str) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(config, sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in comment.splitlines()) + body)
