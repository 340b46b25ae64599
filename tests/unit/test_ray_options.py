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


def test_a_plans_serve_config_gives_its_deployments_under_the_commands_settings(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(PLAN_CONFIG))
    args = app_args_of(Settings(store=tmp_path / "store"), path)
    assert (args.expert("mi2p").num_replicas, args.expert("mi2p").max_batch_size) == (2, 4)
    assert args.ingress.num_cpus == 1
    assert args.settings == {"store": str(tmp_path / "store"), "model": "shapes"}  # --store wins over the file's


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
        model="shapes", version="1", ingress_replicas=3, experts={}, expert_defaults=ExpertOptions(num_cpus=1)
    )
    with pytest.raises(SwapRefused, match=r"up to 3 ingress replicas.*settings.model_version"):
        sets.handles_for(SimpleNamespace(name="shapes", version="2", expert_names=("text",)))


def test_an_experts_options_must_let_a_replica_hold_a_full_batch():
    with pytest.raises(ValueError, match="must exceed max_batch_size"):
        AppArgs.model_validate({"experts": {"text": {"max_batch_size": 16, "max_ongoing_requests": 16}}})
