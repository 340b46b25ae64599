"""The Ray engine's arguments without a cluster: ``--deployments`` read from a Serve config or a file of args
(the command's settings over the file's), a bad file refused with its name, and the refusals of a swap that
need no cluster (an ingress of several replicas)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from service.config import Settings
from service.ray.options import AppArgs, ExpertOptions, app_args_of
from service.ray.versions import ExpertSets, SwapPlan, SwapRefused

PLAN_CONFIG = {  # what dynfuse plan --out writes (abridged)
    "proxy_location": "EveryNode",
    "applications": [
        {"name": "other", "import_path": "elsewhere:app", "args": {}},
        {
            "name": "dynfuse",
            "import_path": "service.ray.app:build",
            "args": {
                "settings": {"store": "/opt/dynfuse/store", "model": "shapes"},
                "ingress": {"num_replicas": 1, "num_cpus": 1},
                "experts": {"mi2p": {"num_replicas": 2, "num_cpus": 1, "max_batch_size": 4}},
            },
        },
    ],
}


def test_no_file_gives_the_defaults_with_the_commands_settings(tmp_path):
    args = app_args_of(Settings(store=tmp_path, port=9000, max_batch_size=8))
    assert args.ingress.num_cpus is None  # sized to the cluster later
    assert args.settings["store"] == str(tmp_path)
    assert args.settings["max_batch_size"] == 8
    assert "port" not in args.settings  # the proxy's, not a replica's
    assert args.settings["host"] == "127.0.0.1"  # where the proxy listens: what checks of exposure see


def test_a_plans_serve_config_gives_its_deployments_under_the_commands_settings(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(PLAN_CONFIG))
    args = app_args_of(Settings(store=tmp_path / "store"), path)
    assert (args.expert("mi2p").num_replicas, args.expert("mi2p").max_batch_size) == (2, 4)
    assert args.ingress.num_cpus == 1
    # --store wins over the file's.
    assert args.settings == {"store": str(tmp_path / "store"), "model": "shapes", "host": "127.0.0.1"}


def test_a_file_of_args_is_read_as_is(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({"expert_defaults": {"num_cpus": 0.5}}))
    assert app_args_of(Settings(), path).expert("text").num_cpus == 0.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a list", "expected a Serve config or the application's args"),
        (yaml.safe_dump({"ingress": {"num_cpuz": 1}}), "num_cpuz"),
        (yaml.safe_dump({"applications": [{"import_path": "elsewhere:app"}]}), "found 0"),
    ],
)
def test_a_bad_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        app_args_of(Settings(), path)
    assert str(path) in str(error.value)


def test_a_swap_is_refused_when_the_ingress_has_several_replicas():
    sets = ExpertSets.__new__(ExpertSets)  # no sweep timer, no cluster: the refusal comes first
    sets.plan = SwapPlan(
        model="shapes",
        version="1",
        ingress_replicas=3,
        experts={},
        expert_defaults=ExpertOptions(num_cpus=1),
        settings={},
    )
    with pytest.raises(SwapRefused, match=r"up to 3 ingress replicas.*settings.model_version"):
        sets.handles_for(SimpleNamespace(name="shapes", version="2", expert_names=("text",)))


def test_an_experts_options_must_let_a_replica_hold_a_full_batch():
    with pytest.raises(ValueError, match="must exceed max_batch_size"):
        AppArgs.model_validate({"experts": {"text": {"max_batch_size": 16, "max_ongoing_requests": 16}}})


def test_each_expert_is_built_with_its_own_threads_and_a_fingerprint_of_what_it_is_built_from():
    plan = SwapPlan(
        model="shapes",
        version="1",
        ingress_replicas=1,
        experts={"mi2p": ExpertOptions(num_cpus=4), "text": ExpertOptions(num_cpus=0.25)},
        expert_defaults=ExpertOptions(num_cpus=1),
        settings={"store": "/s", "model": "shapes", "model_version": "1"},
    )
    sets = ExpertSets(plan, "dynfuse")
    try:
        v2 = SimpleNamespace(name="shapes", version="2")
        assert sets._settings(v2, "mi2p")["threads"] == 4
        assert sets._settings(v2, "text")["threads"] == 1
        assert sets._settings(v2, "text")["model_version"] == "2"
        assert sets.fingerprint(v2, "text") != sets.fingerprint(v2, "mi2p")
        assert sets.fingerprint(v2, "text") != sets.fingerprint(SimpleNamespace(name="shapes", version="1"), "text")
        pinned = ExpertSets(plan.model_copy(update={"settings": {**plan.settings, "threads": 2}}), "dynfuse")
        assert pinned._settings(v2, "mi2p")["threads"] == 2  # DYNFUSE_THREADS, when given, for every replica
        pinned.close()
    finally:
        sets.close()
