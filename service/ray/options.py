"""The arguments of the Ray application (``service.ray.app:build``), as Serve's ``args`` carry them.

``serve run service.ray.app:build store=store``, a Serve config file's ``args:`` and ``dynfuse serve --engine
ray`` all end here. Serve validates them with this model before building the application; a bad value is
refused with pydantic's message, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.config import Settings

IMPORT_PATH = "service.ray.app:build"

# Serve's default of 5 requests in flight per replica throttled a test app 16-fold on this machine: a replica
# must hold more calls than it batches.
INGRESS_MAX_ONGOING = 256
EXPERT_MAX_ONGOING = 64
HEALTH_CHECK_PERIOD_S = 1.0  # Serve's 10 s default left a killed replica dead for 6-7 s; at 1 s, 1.6 s
GRACEFUL_SHUTDOWN_S = 5.0


class DeploymentOptions(BaseModel):
    """One deployment's scale and resources."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Fixed replica count; ignored when autoscaling_config is set.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve's autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...)."
    )
    num_cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs one replica reserves; also its runtime's threads (at least 1). Unset: sized to the "
        "cluster (service/ray/sizing.py): 1 when every replica can have one, else an equal share of the CPUs.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs one replica reserves (with device=cuda).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {'heavy': 1} to place a replica on a node."
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="Calls one replica holds at once.")

    def ray_actor_options(self) -> dict[str, Any]:
        assert self.num_cpus is not None, "size the application to the cluster first (service/ray/sizing.py)"
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def threads(self) -> int:
        """The runtime's intra-op threads: the CPUs the replica reserves (a replica never takes the node's)."""
        return max(1, round(self.num_cpus or 0))


class ExpertOptions(DeploymentOptions):
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most sub-batches one @serve.batch call runs.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Longest wait for a batch to fill.")

    @model_validator(mode="after")
    def _holds_a_batch(self) -> ExpertOptions:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests <= self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must exceed max_batch_size "
                f"({self.max_batch_size}), or the replica never holds a full batch"
            )
        return self


class AppArgs(BaseModel):
    """What ``service.ray.app:build`` takes."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="dynfuse settings (service/config.py: store, model, model_version, backend, device, limits); "
        "unset ones come from the replicas' DYNFUSE_* environment, as for `dynfuse serve`.",
    )
    ingress: DeploymentOptions = Field(default_factory=DeploymentOptions)
    experts: dict[str, ExpertOptions] = Field(
        default_factory=dict, description="Per expert name; an expert not named gets expert_defaults."
    )
    expert_defaults: ExpertOptions = Field(default_factory=ExpertOptions)

    def expert(self, name: str) -> ExpertOptions:
        return self.experts.get(name, self.expert_defaults)


def app_args_of(settings: Settings, path: Path | None = None) -> AppArgs:
    """``dynfuse serve --engine ray``'s application arguments: the deployments of ``path`` (a Serve config, whose
    dynfuse application's args are taken, or a file of args), with the settings of the command (its flags and
    ``DYNFUSE_*`` environment) over the file's."""
    overrides = settings.model_dump(mode="json", exclude_unset=True, exclude={"port", "workers"})
    overrides["host"] = settings.host  # where Serve's proxy listens: what the replicas' checks of exposure see
    if path is None:
        return AppArgs(settings={"store": str(settings.store), **overrides})
    import yaml

    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a Serve config or the application's args, got {type(loaded).__name__}")
    if "applications" in loaded:
        found = [a for a in loaded["applications"] if a.get("import_path") == IMPORT_PATH]
        if len(found) != 1:
            raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}, found {len(found)}")
        loaded = found[0].get("args") or {}
    try:
        args = AppArgs.model_validate(loaded)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return args.model_copy(update={"settings": {**args.settings, **overrides}})
