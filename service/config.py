"""Service settings: environment variables with the prefix ``DYNFUSE_`` (or ``dynfuse serve`` flags)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20
DEFAULT_POLL_S = 15.0  # Triton's --repository-poll-secs default


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DYNFUSE_", protected_namespaces=())

    store: Path = Field(Path("store"), description="Model store directory (STORE/<name>/<version>/model.json).")
    model: str | None = Field(None, description="Model to serve; default: the store's only model.")
    model_version: str | None = Field(None, description="Pin a version; default: the highest in the store.")
    models: str | None = Field(
        None,
        description="More models of the store to serve from the start, beside the default one: comma-separated "
        "names, or '*' for all. Requests pick one with their 'model' field; the repository API loads others later.",
    )
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="Model control, as Triton's --model-control-mode: 'none' (load and unload are refused with 403; "
        "the repository index stays readable), 'explicit' (POST /v2/repository/models/{name}/load and unload, with "
        "the admin key), 'poll' (the store is polled every store_poll_s and each served model swapped to its highest "
        "version; explicit load and unload are refused).",
    )
    store_poll_s: float | None = Field(
        None,
        gt=0,
        description="With model_control=poll: every this many seconds, look for a newer version of each served model "
        f"in the store and swap to it (verified and warmed beside the old one). Default: {DEFAULT_POLL_S:g}.",
    )
    backend: Literal["onnx", "torchscript"] = Field("onnx", description="Runtime for the exported components.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda needs onnxruntime-gpu or a CUDA build of torch.")
    threads: int | None = Field(None, ge=1, description="Intra-op threads of the runtime; default: all cores.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService, which "
        "tritonclient.grpc and KServe's gRPC client speak) on this port of the same host, in the same process as HTTP: "
        "same models, batcher, limits and metrics. Default: off (8001 in the Docker image); 0 picks a free port.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Server processes sharing the port. Each loads the model and batches on its own, and the "
        "runtime's threads are split between them; metrics are summed across them. 0 (the default): one per core "
        "this process may use (its CPU affinity and cgroup quota), since a process runs its requests' Python under "
        "one GIL; one with device=cuda.",
    )

    # 64, not 16: routing splits a batch into one sub-batch per expert, and each sub-batch pays the runtime's call
    # and the pipeline's Python whatever its size; at 16 those sub-batches were a few rows each, and route auto kept
    # less of what it saved in the model (bench/BENCHMARKS.md, "A batch big enough to split"). 64 is also the most
    # rows a batch call may carry (max_batch_inputs), so the largest call is one batch.
    max_batch_size: int = Field(64, ge=1, le=1024, description="Most requests one micro-batch holds.")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=1000, description="Longest wait for a batch to fill.")
    max_queue: int = Field(
        256,
        ge=1,
        description="Items (requests, or rows of batch calls) waiting for a batch; when full, new calls get 503.",
    )
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="Inference requests admitted at once (reading, decoding, queued or in a batch); more are refused "
        "503 before their body is read. Default: half of max_queue, so that admitted single requests always fit in "
        "the queue with room left for the extra rows of batch calls.",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Deadline of one inference request from its arrival: a body not received by then is answered "
        "408, an answer not ready by then 504.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with a 503.")
    refusals_per_s: float = Field(
        200.0,
        gt=0,
        description="Over-capacity refusals answered per second and process; the others wait their turn (at most "
        "3 s), so that clients retrying at once cannot spend the CPU the refusals save.",
    )
    decode_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads that decode big images (small ones decode on the event loop); each holds at most one "
        "decoded image of up to max_image_pixels.",
    )

    max_body_bytes: int = Field(10 * MIB, ge=1024, description="Larger request bodies are answered 413.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Larger images (width x height) are answered 413.")
    max_text_chars: int = Field(2000, ge=1, description="Longer texts are answered 413.")
    max_batch_inputs: int = Field(
        64, ge=1, description="Most inputs one /v1/classify/batch call (or rows one /v2 infer call) may carry."
    )
    drain_max_bytes: int = Field(
        64 * MIB,
        ge=0,
        description="A body over max_body_bytes is read and discarded up to this size before the 413, so that clients "
        "that write the whole body before reading (urllib, requests) read the 413 instead of a reset.",
    )
    drain_timeout_s: float = Field(
        5.0, ge=0, le=300, description="Longest time spent discarding an oversized body before the 413."
    )

    # Operating points (DESIGN.md "Operating points"): where on the accuracy/compute curve requests are served.
    operating_point: str | None = Field(
        None,
        description="The operating point (a router of the model, GET /v1/models/{name} lists them) for requests "
        "that name none; default: the one the store marks as served.",
    )
    min_confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Confidence fallback for requests that set none: when a cheaper expert's top probability is "
        "below this, the full path runs too. Default: the floor the store serves with its default operating point "
        "(model.json router.min_confidence; GET /v1/models/{name} shows default_min_confidence), off for a model "
        "without one. 0 turns it off.",
    )
    degrade_to: str | None = Field(
        None,
        description="Under load, serve requests that name no operating point at this cheaper one instead of "
        "refusing them: from degrade_high_water queued requests until the queue drains to degrade_low_water. "
        "Default: off.",
    )
    degrade_high_water: int | None = Field(
        None, ge=1, description="Queued requests at which degrading starts; default: a quarter of the capacity."
    )
    degrade_low_water: int | None = Field(
        None, ge=0, description="Queued requests at or below which degrading stops; default: a quarter of the high."
    )

    # Is routing still safe? (DESIGN.md): shadow audits, drift of the route mix, the guard, "uncertain" answers.
    audit_rate: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Share of the answers a cheaper expert gave that are re-run on the full path after the response "
        "was sent, in spare capacity only (never ahead of a request; dropped, and counted, under load), to measure "
        "their agreement with the full path (dynfuse_audits_total). 0: no audits (and so no guard).",
    )
    guard: bool = Field(
        True,
        description="When the audits give evidence that the served operating point's agreement with the full path "
        "fell (a one-sided CUSUM on the audit outcomes against its validation figure, its threshold set by "
        "guard_false_alarm_audits), serve requests that name no operating point and no min_confidence with the "
        "safer policy measured at export (a confidence floor), until agreement is back above validation minus "
        "guard_recover_margin.",
    )
    guard_margin: float = Field(
        0.06,
        gt=0.0,
        lt=1.0,
        description="The fall in agreement (below the validation figure) the guard's CUSUM is designed to detect: "
        "larger falls are detected sooner, smaller ones later.",
    )
    guard_recover_margin: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Agreement back within this of the validation figure, over at least guard_min_audits audits "
        "since the guard engaged, releases it (below guard_margin: the gap is the hysteresis).",
    )
    guard_window: int = Field(
        100,
        ge=1,
        description="Audit outcomes the recent agreement is judged over (the most recent ones): the release, and "
        "what GET /v1/models/{name} shows.",
    )
    guard_min_audits: int = Field(
        50,
        ge=1,
        description="Audit outcomes, since the guard engaged, needed before it releases (engaging is the CUSUM's).",
    )
    guard_false_alarm_audits: float = Field(
        10000,
        gt=1,
        le=1e9,
        description="The guard's false-alarm rate: audits, on average, between engagements while agreement is at "
        "its validation figure (the CUSUM's in-control average run length; its threshold is computed from it). "
        "Higher: fewer false engagements, later detection.",
    )
    guard_shifted_false_alarm_audits: float = Field(
        100,
        gt=1,
        le=1e9,
        description="The same, while the inputs clearly changed (guard_input_shift_share): the CUSUM then engages "
        "at the lower threshold this gives. At most guard_false_alarm_audits.",
    )
    guard_input_shift_share: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of out-of-distribution requests (p-value below uncertain_ood_alpha; in control about "
        "that share) that means the inputs changed: a CUSUM on the routed requests' flags, designed to detect "
        "it, lowers the guard's threshold while it is up. Engaging still needs the audits. 0 (or not above "
        "uncertain_ood_alpha): not used.",
    )
    guard_input_false_alarm_requests: float = Field(
        20000,
        gt=1,
        le=1e9,
        description='Routed requests, on average, between false "inputs changed" while inputs are like '
        "validation's (the inputs' CUSUM's in-control average run length).",
    )
    drift_window: int = Field(
        500,
        ge=1,
        description="Recent router decisions per operating point whose route mix is compared with validation.",
    )
    uncertain_confidence: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="An answer whose path's calibrated top probability is below this is flagged uncertain "
        "(uncertain_reason 'low_confidence'). 0: never for this reason.",
    )
    uncertain_ood_alpha: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="An input whose features are less typical of the validation data than this share of validation "
        "inputs is flagged uncertain (uncertain_reason 'out_of_distribution'); about this share of inputs like the "
        "training data are flagged. 0: never for this reason.",
    )

    api_key: str | None = Field(
        None,
        description="An inference key: when set (or api_keys_file is), inference calls and model metadata need "
        "'Authorization: Bearer <key>'. Named 'default' in the metrics. It never loads or unloads a model.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of named inference keys, one 'NAME:KEY' per line ('#' comments, blank lines skipped), "
        "each accepted like api_key; the NAME labels the request metrics. Re-read within a second of a change, so "
        "that one key is revoked by removing its line.",
    )
    admin_key: str | None = Field(
        None,
        description="The key of model control calls (load, unload) with model_control=explicit; inference keys are "
        "never enough. Needed unless the server listens on loopback only.",
    )
    log_level: str = "info"

    ray_placement_wait_s: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="With --engine ray --address: how long deployments the cluster has no room for wait for it (an "
        "autoscaling cluster adding nodes) before the start is refused, naming what is missing. A local cluster "
        "refuses at once: nothing will be added to it.",
    )
    ray_proxy_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="With --engine ray: how long the start waits for Ray Serve's HTTP proxy to answer on the port, "
        "and how long Serve's controller waits for a starting proxy's ready check before it kills it (Ray's own "
        "limits, 60 s and 5 s, are too short for a small machine whose cores are busy); past it the command stops, "
        "naming this variable.",
    )
    ray_expert_hold_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="With --engine ray: how long an ingress batch waits for its expert deployments before its rows "
        "whose experts answered are answered; the rows of an expert still computing (a replica being replaced) "
        "are answered when it answers, or get its error by the request deadline. The answers are the same either "
        "way.",
    )

    @field_validator("store")
    @classmethod
    def _store_is_not_a_file(cls, value: Path) -> Path:
        if value.is_file():
            raise ValueError(f"{value} is a file; DYNFUSE_STORE must be a directory (STORE/<name>/<version>/)")
        return value

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _grpc_off_when_blank(cls, value):
        if isinstance(value, str) and not value.strip():
            return None  # DYNFUSE_GRPC_PORT= (empty) turns gRPC off, e.g. over the image's 8001
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None  # an empty DYNFUSE_API_KEY= means no key, not a key of ""
        return value.strip() if value is not None else None  # as sent after 'Bearer ': surrounding spaces go

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _no_file_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _keys_file_reads(self) -> Settings:
        if self.api_keys_file is not None:
            from service.auth import AccessPolicy  # reads and parses the file, as the server will

            AccessPolicy.from_settings(self)
        return self

    @model_validator(mode="after")
    def _control_is_guarded(self) -> Settings:
        from service.auth import is_loopback

        if self.model_control == "explicit" and self.admin_key is None and not is_loopback(self.host):
            raise ValueError(
                f"DYNFUSE_MODEL_CONTROL=explicit without DYNFUSE_ADMIN_KEY on DYNFUSE_HOST={self.host}: anyone who "
                "can reach the port could load and unload models. Set DYNFUSE_ADMIN_KEY, or listen on loopback only "
                "(127.0.0.1, ::1, localhost)"
            )
        if self.store_poll_s is not None and self.model_control != "poll":
            raise ValueError(
                f"DYNFUSE_STORE_POLL_S is set but DYNFUSE_MODEL_CONTROL={self.model_control}: the store is polled "
                "only with DYNFUSE_MODEL_CONTROL=poll"
            )
        return self

    @property
    def poll_interval_s(self) -> float | None:
        """Seconds between store polls; None when the store is not polled."""
        if self.model_control != "poll":
            return None
        return self.store_poll_s or DEFAULT_POLL_S

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> Settings:
        if self.max_queue < self.max_batch_size:
            raise ValueError(
                f"max_queue ({self.max_queue}) is smaller than max_batch_size ({self.max_batch_size}): "
                "raise DYNFUSE_MAX_QUEUE or lower DYNFUSE_MAX_BATCH_SIZE"
            )
        return self

    @model_validator(mode="after")
    def _grpc_port_of_its_own(self) -> Settings:
        if self.grpc_port is not None and self.grpc_port != 0 and self.grpc_port == self.port:
            raise ValueError(
                f"DYNFUSE_GRPC_PORT ({self.grpc_port}) is the HTTP port (DYNFUSE_PORT): gRPC needs a port of its own, "
                "e.g. 8001 beside 8000"
            )
        if self.grpc_port == 0 and self.workers > 1:  # 0 workers (one per core): serve() checks once resolved
            raise ValueError(
                "DYNFUSE_GRPC_PORT=0 (any free port) would give each of the DYNFUSE_WORKERS processes a different "
                "port: name the port, or serve one process (DYNFUSE_WORKERS=1)"
            )
        return self

    @model_validator(mode="after")
    def _water_marks_in_order(self) -> Settings:
        if self.degrade_to is not None and self.water_marks[1] >= self.water_marks[0]:
            high, low = self.water_marks
            raise ValueError(
                f"degrade_low_water ({low}) must be below degrade_high_water ({high}): the gap keeps the server "
                "from flapping between operating points"
            )
        return self

    @model_validator(mode="after")
    def _guard_has_hysteresis(self) -> Settings:
        if self.guard_recover_margin >= self.guard_margin:
            raise ValueError(
                f"guard_recover_margin ({self.guard_recover_margin}) must be below guard_margin "
                f"({self.guard_margin}): the gap keeps the guard from flapping; lower DYNFUSE_GUARD_RECOVER_MARGIN or "
                "raise DYNFUSE_GUARD_MARGIN"
            )
        if self.guard_shifted_false_alarm_audits > self.guard_false_alarm_audits:
            raise ValueError(
                f"guard_shifted_false_alarm_audits ({self.guard_shifted_false_alarm_audits}) is more than "
                f"guard_false_alarm_audits ({self.guard_false_alarm_audits}): changed inputs may only make the guard "
                "quicker; lower DYNFUSE_GUARD_SHIFTED_FALSE_ALARM_AUDITS"
            )
        if self.guard_min_audits > self.guard_window:
            raise ValueError(
                f"guard_min_audits ({self.guard_min_audits}) is more than guard_window ({self.guard_window}) holds: "
                "lower DYNFUSE_GUARD_MIN_AUDITS or raise DYNFUSE_GUARD_WINDOW"
            )
        return self

    @property
    def water_marks(self) -> tuple[int, int]:
        """(high, low): queued requests at which degrading starts, and at or below which it stops."""
        high = self.degrade_high_water or max(2, self.capacity // 4)
        low = self.degrade_low_water if self.degrade_low_water is not None else high // 4
        return high, low

    @property
    def capacity(self) -> int:
        """Inference requests admitted at once (``max_inflight``, or half of ``max_queue``)."""
        return self.max_inflight or max(1, self.max_queue // 2)


def check_settings_for(model, settings: Settings) -> None:
    """The settings that name something of ``model`` (an ``export.store.StoredModel``) name what it has;
    StoreError naming the variable otherwise. ``dynfuse serve`` checks them before it starts, and every load
    again."""
    from export.store import StoreError

    for setting, point in (
        ("DYNFUSE_OPERATING_POINT", settings.operating_point),
        ("DYNFUSE_DEGRADE_TO", settings.degrade_to),
    ):
        if point is not None and point not in model.operating_points:
            raise StoreError(
                f"{setting}={point!r} is not an operating point of {model.name} v{model.version}; "
                f"it has: {', '.join(model.operating_points)}"
            )


SECRET_FIELDS = frozenset({"api_key", "admin_key"})  # their values never appear in an error message


class SettingsError(ValueError):
    """A setting the server cannot start with; the message names the environment variable."""


def load_settings(**overrides) -> Settings:
    """The settings from the ``DYNFUSE_*`` environment and ``overrides`` (``dynfuse serve``'s flags). A bad
    value raises SettingsError naming the variable, as a user sets it: ``DYNFUSE_MAX_QUEUE='abc': Input should
    be a valid integer``, not pydantic's field name."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_settings_error(error)) from None


def describe_settings_error(error: ValidationError) -> str:
    lines = []
    for entry in error.errors():
        message = entry.get("msg", "invalid").removeprefix("Value error, ")
        field = next((str(part) for part in entry.get("loc", ()) if isinstance(part, str)), None)
        if field is None:  # a rule across several settings: its message names them
            lines.append(message)
            continue
        variable = f"DYNFUSE_{field.upper()}"
        shown = "" if field in SECRET_FIELDS or "input" not in entry else f"={_short(entry['input'])}"
        lines.append(f"{variable}{shown}: {message}")
    return "; ".join(lines) or str(error)


def _short(value) -> str:
    text = repr(str(value)) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@lru_cache
def get_settings() -> Settings:
    return load_settings()
