"""The application's deployments sized to the cluster they run on, and a check that they can be placed there.

Nothing here imports Ray: the cluster is described by what each node has free and has in all, which
``cluster_now()`` in service/ray/app.py reads from Ray.

**Sizing.** A deployment whose ``num_cpus`` is not given shares the CPUs the given ones leave: one CPU per
replica when there are enough, else an equal fraction each (a 2-CPU machine runs the ingress and seven
experts at 0.25 CPU a replica). When the served version may be swapped (model control on), a second copy of
every expert must fit beside the first while the swap is under way (service/ray/versions.py), so the experts
are counted twice.

**Placement.** Every replica asks for its resources on one node. ``unplaceable`` packs the replicas onto the
nodes (largest first, first fit) and returns, for each deployment whose replicas do not all fit, what it asks
for and what is missing; an empty list means they fit. This is Ray's own rule (a replica waits until one node
has all it asks for), so a refusal here is what Ray would do, but at once instead of never.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.ray.options import AppArgs, DeploymentOptions

# Ray keeps fractional resources to 4 decimal places; a share is rounded down so the shares sum to no more
# than the CPUs.
RESOURCE_STEP = 1e-4
# Below this, a replica would get a few percent of a core: the sizing refuses to go lower, so the placement
# check names the CPUs missing instead of starting replicas that cannot keep up with a health check.
MIN_SHARE = 0.05
EXPERT_COPIES_DURING_A_SWAP = 2


@dataclass(frozen=True)
class Demand:
    """What one deployment asks of the cluster: ``replicas`` times ``per_replica``."""

    deployment: str
    replicas: int
    per_replica: dict[str, float]

    def describe(self) -> str:
        asked = ", ".join(f"{name} {amount:g}" for name, amount in sorted(self.per_replica.items()) if amount)
        return f"{self.deployment}: {self.replicas} x {{{asked or 'nothing'}}}"


def replicas_at_start(options: DeploymentOptions) -> int:
    """Replicas Serve starts with: the fixed count, or the autoscaler's initial (else minimum, at least 1)."""
    if not options.autoscaling_config:
        return options.num_replicas
    config = options.autoscaling_config
    return max(1, int(config.get("initial_replicas") or config.get("min_replicas") or 1))


def size_to_cluster(args: AppArgs, experts: list[str], cpus: float, expert_copies: int = 1) -> AppArgs:
    """``args`` with every ``num_cpus`` left unset filled in from the cluster's ``cpus`` (see the module)."""
    deployments = {"ingress": args.ingress, **{name: args.expert(name) for name in experts}}
    weight = {"ingress": 1, **dict.fromkeys(experts, expert_copies)}
    given = sum(
        weight[name] * replicas_at_start(o) * o.num_cpus for name, o in deployments.items() if o.num_cpus is not None
    )
    unset = sum(weight[name] * replicas_at_start(o) for name, o in deployments.items() if o.num_cpus is None)
    if not unset:
        return args
    share = max(0.0, cpus - given) / unset
    share = 1.0 if share >= 1 else max(MIN_SHARE, math.floor(share / RESOURCE_STEP) * RESOURCE_STEP)
    share = round(share, 4)

    def sized(options: DeploymentOptions) -> DeploymentOptions:
        return options if options.num_cpus is not None else options.model_copy(update={"num_cpus": share})

    return args.model_copy(
        update={
            "ingress": sized(args.ingress),
            "experts": {name: sized(args.expert(name)) for name in experts},
            "expert_defaults": sized(args.expert_defaults),
        }
    )


def demands(args: AppArgs, experts: list[str], expert_prefix: str = "expert_") -> list[Demand]:
    """What each deployment of the (sized) application asks for."""
    named = [("ingress", args.ingress), *((f"{expert_prefix}{name}", args.expert(name)) for name in experts)]
    return [Demand(name, replicas_at_start(o), per_replica(o)) for name, o in named]


def per_replica(options: DeploymentOptions) -> dict[str, float]:
    assert options.num_cpus is not None, "size_to_cluster first: num_cpus is still unset"
    return {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources}


def unplaceable(
    wanted: list[Demand], free_per_node: list[dict[str, float]], total_per_node: list[dict[str, float]] | None = None
) -> list[str]:
    """Empty when every replica fits; else a line with what all the deployments ask for against what is free,
    then one for each deployment whose replicas do not all fit (what it asks for, and why).

    ``free_per_node``: what each node has free now; ``total_per_node``: what each has in all (to tell "no node
    is that big" from "the nodes are busy"), the free figures when not given."""
    room = [dict(node) for node in free_per_node]
    replicas = [(demand, demand.per_replica) for demand in wanted for _ in range(demand.replicas)]
    replicas.sort(key=lambda pair: -sum(pair[1].values()))
    short: dict[str, int] = {}
    for demand, need in replicas:
        node = next((n for n in room if _fits(need, n)), None)
        if node is None:
            short[demand.deployment] = short.get(demand.deployment, 0) + 1
            continue
        for key, amount in need.items():
            node[key] = node.get(key, 0.0) - amount
    if not short:
        return []
    totals = total_per_node if total_per_node is not None else free_per_node
    asked = _total(wanted)
    free = _sum(free_per_node)
    lines = [
        "the deployments ask for "
        + ", ".join(f"{k} {v:g}" for k, v in asked.items())
        + " in all, where the cluster has "
        + ", ".join(f"{k} {free.get(k, 0.0):g}" for k in asked)
        + " free"
    ]
    for demand in wanted:
        if demand.deployment not in short:
            continue
        need = {k: v for k, v in demand.per_replica.items() if v}
        if not any(_fits(need, node) for node in totals):
            largest = {k: max((node.get(k, 0.0) for node in totals), default=0.0) for k in need}
            biggest = ", ".join(f"{k} {v:g}" for k, v in largest.items())
            lines.append(f"{demand.describe()}: no node has that much (the largest has {biggest})")
        else:
            lines.append(f"{demand.describe()}: {short[demand.deployment]} replica(s) find no room")
    return lines


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= amount for key, amount in need.items() if amount)


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for key, amount in node.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def _total(wanted: list[Demand]) -> dict[str, float]:
    total: dict[str, float] = {}
    for demand in wanted:
        for key, amount in demand.per_replica.items():
            if amount:
                total[key] = round(total.get(key, 0.0) + amount * demand.replicas, 4)
    return total


def summary(wanted: list[Demand]) -> str:
    """One line: every deployment's replicas and resources."""
    return "; ".join(demand.describe() for demand in wanted)
