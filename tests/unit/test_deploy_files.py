"""The deployment files under deploy/: the Serve config passes Ray's own schema and the application's argument
model, and the KubeRay RayService carries that same config on a cluster that can run it (no offline schema of
the RayService CRD exists here, so its structure is checked field by field)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.ray.options import AppArgs

pytestmark = pytest.mark.ray

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def serve_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def dynfuse_application(config: dict) -> dict:
    [application] = [a for a in config["applications"] if a["import_path"] == "service.ray.app:build"]
    return application


def test_the_serve_config_passes_rays_schema_and_the_apps_arguments():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    serve_schema().model_validate(config)
    args = AppArgs.model_validate(dynfuse_application(config)["args"])
    assert args.settings["store"] == "/opt/dynfuse/store", "the store baked into the image"
    for name, expert in args.experts.items():
        assert expert.max_batch_size >= 1, name


def experts_missing_from(config: dict) -> set[str]:
    """The default model's experts (those ``dynfuse build-default`` trains) that a Serve config gives no options:
    they would run with the defaults (one replica sized to the cluster), not as planned."""
    from models.dynamic_fusion import preset_config

    return set(preset_config("default").experts) - set(dynfuse_application(config)["args"]["experts"])


def test_the_serve_config_names_every_expert_of_the_default_model():
    from export.default_model import DEFAULT_NAME

    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert dynfuse_application(config)["args"]["settings"]["model"] == DEFAULT_NAME
    assert experts_missing_from(config) == set()


def test_a_serve_config_without_an_expert_of_the_default_model_is_noticed():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    del dynfuse_application(config)["args"]["experts"]["mulmix"]
    assert experts_missing_from(config) == {"mulmix"}


def test_a_bad_serve_config_is_refused_by_rays_schema():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    config["applications"][0]["runtime_env"] = "not a mapping"
    with pytest.raises(ValueError, match="runtime_env"):
        serve_schema().model_validate(config)


def test_the_rayservice_carries_the_serve_config_on_a_cluster_that_can_run_it():
    manifest = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((DEPLOY / "serve.yaml").read_text()), "rayservice.yaml and serve.yaml differ"
    serve_schema().model_validate(serve_config)

    cluster = manifest["spec"]["rayClusterConfig"]
    ray_pin = next(line for line in (DEPLOY / "Dockerfile.ray").read_text().splitlines() if "ray[serve]==" in line)
    assert f"ray[serve]=={cluster['rayVersion']}" in ray_pin, "the image's Ray and rayVersion must be the same"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # KubeRay passes rayStartParams to `ray start` as strings; a YAML number is refused by the CRD.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["rayStartParams"].get("metrics-export-port") == "8080"
        [container] = group["template"]["spec"]["containers"]
        assert container["image"] == "dynfuse:ray"
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in container.get("env", [])
    head_ports = {
        p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["serve"] == serve_config["http_options"]["port"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]

    # The workers hold the planned replicas: each reserves its num_cpus.
    args = AppArgs.model_validate(dynfuse_application(serve_config)["args"])
    cpus_needed = args.ingress.num_cpus * args.ingress.num_replicas + sum(
        e.num_cpus * e.num_replicas for e in args.experts.values()
    )
    cpus_at_most = sum(
        float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]) * g["maxReplicas"]
        for g in cluster["workerGroupSpecs"]
    )
    assert cpus_needed <= cpus_at_most, (cpus_needed, cpus_at_most)
