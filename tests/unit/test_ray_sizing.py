"""service/ray/sizing.py without a cluster: deployments sized to the CPUs a cluster has, and what does not fit
named, for the figures a user meets (a 2-core laptop, an 8-core one, a GPU node). The expected shares are
worked out by hand in each test."""

from __future__ import annotations

from service.ray.options import AppArgs
from service.ray.sizing import demands, size_to_cluster, unplaceable

EXPERTS = ["text", "image_lite", "image", "late_fusion", "mulmix", "mi2p", "muse"]  # the default model's seven


def cpus_of(args: AppArgs) -> dict[str, float]:
    return {"ingress": args.ingress.num_cpus, **{e: args.expert(e).num_cpus for e in EXPERTS}}


def test_two_cpus_are_shared_by_the_ingress_and_seven_experts():
    sized = size_to_cluster(AppArgs(), EXPERTS, cpus=2)
    assert set(cpus_of(sized).values()) == {0.25}  # 2 / 8
    assert sized.ingress.threads() == 1


def test_room_is_left_for_a_second_version_of_the_experts_when_the_version_may_change():
    sized = size_to_cluster(AppArgs(), EXPERTS, cpus=2, expert_copies=2)
    assert set(cpus_of(sized).values()) == {0.1333}  # 2 / (1 + 2 * 7), rounded down to Ray's 1e-4
    wanted = demands(sized, EXPERTS)
    assert sum(d.per_replica["CPU"] * d.replicas for d in wanted) * 2 - 0.1333 <= 2


def test_a_cluster_with_a_cpu_for_each_deployment_gives_each_one():
    assert set(cpus_of(size_to_cluster(AppArgs(), EXPERTS, cpus=8)).values()) == {1.0}
    assert set(cpus_of(size_to_cluster(AppArgs(), EXPERTS, cpus=64)).values()) == {1.0}


def test_given_cpus_are_kept_and_the_rest_share_what_they_leave():
    args = AppArgs.model_validate(
        {"ingress": {"num_cpus": 1}, "experts": {"mi2p": {"num_cpus": 0.5, "num_replicas": 2}}}
    )
    sized = cpus_of(size_to_cluster(args, EXPERTS, cpus=4))
    assert (sized["ingress"], sized["mi2p"]) == (1, 0.5)
    assert {sized[e] for e in EXPERTS if e != "mi2p"} == {0.3333}  # (4 - 1 - 2 * 0.5) / 6, rounded down


def test_autoscaled_deployments_count_their_initial_replicas():
    args = AppArgs.model_validate(
        {"experts": {"text": {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 3}}}}
    )
    sized = size_to_cluster(args, EXPERTS, cpus=5)
    assert sized.expert("text").num_cpus == 0.5  # 5 CPUs over 1 + 3 + 6 replicas
    [text] = [d for d in demands(sized, EXPERTS) if d.deployment == "expert_text"]
    assert text.replicas == 3


def test_what_fits_is_placed_and_nothing_is_reported():
    sized = size_to_cluster(AppArgs(), EXPERTS, cpus=2)
    assert unplaceable(demands(sized, EXPERTS), [{"CPU": 2.0, "memory": 1e9}]) == []


def test_replicas_of_one_cpu_on_two_cpus_are_refused_naming_each_deployment_that_does_not_fit():
    args = AppArgs.model_validate({"ingress": {"num_cpus": 1}, "expert_defaults": {"num_cpus": 1}})
    lines = unplaceable(demands(size_to_cluster(args, EXPERTS, cpus=2), EXPERTS), [{"CPU": 2.0}])
    assert lines[0] == "the deployments ask for CPU 8 in all, where the cluster has CPU 2 free"
    # Largest first, first fit: two of the eight replicas of 1 CPU find room, six do not.
    assert len(lines) == 1 + 6
    assert all(line.endswith("1 x {CPU 1}: 1 replica(s) find no room") for line in lines[1:])


def test_a_replica_larger_than_any_node_says_so():
    args = AppArgs.model_validate({"experts": {"mi2p": {"num_cpus": 1, "num_gpus": 1}}})
    sized = size_to_cluster(args, EXPERTS, cpus=8)
    nodes = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 0.0}]
    lines = unplaceable(demands(sized, EXPERTS), nodes)
    assert lines[1:] == ["expert_mi2p: 1 x {CPU 1, GPU 1}: no node has that much (the largest has CPU 8, GPU 0)"]


def test_busy_nodes_are_told_from_small_ones():
    sized = size_to_cluster(AppArgs(), EXPERTS, cpus=2)
    free, total = [{"CPU": 0.25}], [{"CPU": 2.0}]  # another version's experts hold the rest
    lines = unplaceable(demands(sized, EXPERTS), free, total)
    assert lines[0] == "the deployments ask for CPU 2 in all, where the cluster has CPU 0.25 free"
    assert len(lines) == 1 + 7
    assert all(line.endswith("replica(s) find no room") for line in lines[1:])
