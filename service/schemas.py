"""Request and response bodies of HTTP API v1. Every field is described: this is the OpenAPI page users read."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ROUTE_DESCRIPTION = (
    "'auto' lets the router decide; 'soft' runs every eligible expert and mixes their probabilities by the router's "
    "weights (DRDF's expert fusion); an expert's name (e.g. 'text', 'image_lite', 'mi2p'; GET /v1/models/{name} "
    "lists them) forces that path."
)
OPERATING_POINT_DESCRIPTION = (
    "Which of the model's routers decides (a point on its accuracy/compute curve; GET /v1/models/{name} lists "
    "them with their validation figures). Default: the server's."
)
MIN_CONFIDENCE_DESCRIPTION = (
    "Confidence fallback: when a cheaper expert's top probability is below this, the full path runs too and its "
    "answer is returned (decided_by 'confidence'; compute counts both). Default: the server's (off unless set)."
)
EXPLAIN_DESCRIPTION = (
    "Also compute the exact two-player Shapley values of the answer's log-probability over {text, image} on the "
    "expert that answered (a modality removed the way the model was trained to see it missing), returned in "
    "'explanation'. It runs that expert's fusion part twice more; compute.madds counts it."
)
MODEL_DESCRIPTION = "The served model to ask (GET /v1/models lists them); default: the server's default model."
THRESHOLD_DESCRIPTION = (
    "Serving-time knob along the accuracy/compute curve: when the router picks a path cheaper than the full "
    "one with a score below this, the request escalates to the full path. 0 = the router alone; 1 = always full."
)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(None, description="The image file (PNG, JPEG, WebP, GIF or BMP), base64-encoded.")
    text: str | None = Field(
        None, description="The text paired with the image. Either modality may be absent, not both."
    )
    route: str = Field("auto", description=ROUTE_DESCRIPTION)
    threshold: float | None = Field(None, ge=0.0, le=1.0, description=THRESHOLD_DESCRIPTION)
    operating_point: str | None = Field(None, description=OPERATING_POINT_DESCRIPTION)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description=MIN_CONFIDENCE_DESCRIPTION)
    model: str | None = Field(None, description=MODEL_DESCRIPTION)
    explain: bool = Field(False, description=EXPLAIN_DESCRIPTION)


class BatchInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = Field(None, max_length=200, description="Echoed in the matching output; default: its position.")
    image: str | None = Field(None, description="Base64-encoded image file.")
    text: str | None = Field(None, description="The paired text.")


class BatchClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: list[BatchInput] = Field(..., min_length=1, description="Image-text pairs, answered in this order.")
    route: str = Field("auto", description=ROUTE_DESCRIPTION)
    threshold: float | None = Field(None, ge=0.0, le=1.0, description=THRESHOLD_DESCRIPTION)
    operating_point: str | None = Field(None, description=OPERATING_POINT_DESCRIPTION)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description=MIN_CONFIDENCE_DESCRIPTION)
    model: str | None = Field(None, description=MODEL_DESCRIPTION)
    explain: bool = Field(False, description=EXPLAIN_DESCRIPTION)


class RouteInfo(BaseModel):
    expert: str = Field(..., description="The expert path whose answer this is, or 'soft' (every eligible one ran).")
    decided_by: str = Field(
        ...,
        description="router | threshold (escalated to full) | request (forced, or soft) | missing_modality | "
        "confidence (the cheaper expert was unsure: the full path ran too)",
    )
    scores: dict[str, float] = Field(..., description="The router's calibrated score per expert (sums to 1).")
    modality_weights: dict[str, float] = Field(
        ...,
        description="DRDF's modal weights: how decisive each modality's router was for the choice of path "
        "(text + image = 1; a modality the request lacks gets 0). A property of the routing step, not of the answer.",
    )
    operating_point: str = Field(..., description="The router (operating point) that decided.")
    degraded: bool = Field(
        ..., description="True when the server chose a cheaper operating point because it was under load."
    )
    weights: dict[str, float] | None = Field(
        None, description="route=soft only: each expert's weight in the mixture (0 for one that could not run)."
    )
    fallback_from: str | None = Field(
        None, description="decided_by=confidence only: the cheaper expert whose unsure answer was replaced."
    )
    guarded: bool = Field(
        ...,
        description="True when the server's guard served this request with a safer policy than it would otherwise "
        "get (a confidence floor), because audited answers stopped agreeing with the full path as they did on "
        "validation. GET /v1/models/{name} shows the guard's state.",
    )


IMPORTANCE_DESCRIPTION = (
    "What each modality did for the returned answer: its share of what raised the answering expert's "
    "log-probability of the label, from two-player Shapley values over {text, image} (text + image = 1). An "
    "expert that reads one modality gives it 1. Unlike route.modality_weights, which says how decisive each "
    "modality's router was for the choice of path, this is about the answer."
)


class Importance(BaseModel):
    text: float = Field(..., description="The text's share of what raised the answer's log-probability (0..1).")
    image: float = Field(..., description="The image's share; text + image = 1.")


class ShapleyValues(BaseModel):
    text: float = Field(..., description="phi_text, in nats of log p(label); negative: the text argued against it.")
    image: float = Field(..., description="phi_image; phi_text + phi_image = log_prob.both - log_prob.neither.")


class CoalitionLogProbs(BaseModel):
    both: float = Field(..., description="log p(label) with both modalities, as answered.")
    text_only: float = Field(..., description="log p(label) with the image removed.")
    image_only: float = Field(..., description="log p(label) with the text removed.")
    neither: float = Field(..., description="log p(label) with both removed (the same for every request).")


class CoalitionLabels(BaseModel):
    text_only: str = Field(..., description="The label the answer would have had with the image removed.")
    image_only: str = Field(..., description="The label with the text removed.")
    neither: str = Field(..., description="The label with both removed.")


class Explanation(BaseModel):
    shapley: ShapleyValues = Field(..., description="The exact two-player Shapley values of log p(label).")
    importance: Importance = Field(
        ..., description="The same values as shares, normalized as 'importance' is: the exact reference for it."
    )
    log_prob: CoalitionLogProbs = Field(..., description="The four values of the game the Shapley values split.")
    labels: CoalitionLabels = Field(..., description="What the answering expert says with a modality removed.")


class Compute(BaseModel):
    madds: int = Field(
        ...,
        description="Multiply-adds this request executed: encoders run + router + its expert + its attribution.",
    )
    madds_full: int = Field(..., description="Multiply-adds of the static full model on the same input.")
    saved_ratio: float = Field(..., description="1 - madds / madds_full; slightly negative on the full path.")
    attribution_madds: int = Field(
        ..., description="The part of madds spent on importance (and on the explanation, when asked)."
    )


class Timing(BaseModel):
    queue: float = Field(..., description="Milliseconds waiting for a micro-batch.")
    inference: float = Field(..., description="Milliseconds of the micro-batch that carried this request.")
    total: float = Field(..., description="Milliseconds from receipt to response.")


class ClassifyResponse(BaseModel):
    id: str = Field(..., description="The request id (X-Request-ID when sent) or the batch input's id.")
    model: str
    model_version: str
    label: str = Field(..., description="The predicted class.")
    scores: dict[str, float] = Field(..., description="Class probabilities from the expert that ran.")
    route: RouteInfo
    importance: Importance = Field(..., description=IMPORTANCE_DESCRIPTION)
    importance_method: str = Field(
        ...,
        description="How importance was computed: one_modality (the expert reads one), exact (Shapley values, the "
        "expert's fusion part rerun), head (the same from a small head distilled from exact values), mixture "
        "(route=soft: each expert's, weighted by its part in the label's probability), unavailable (a model "
        "exported before attribution: DRDF's modality weights).",
    )
    explanation: Explanation | None = Field(None, description="explain=true only: " + EXPLAIN_DESCRIPTION)
    uncertain: bool = Field(
        ...,
        description="True when this answer deserves doubt: its path's calibrated top probability is low, or the "
        "input is unlike the data the model was validated on. It is still the model's best answer.",
    )
    uncertain_reason: str | None = Field(
        None, description="When uncertain: 'out_of_distribution' (checked first) or 'low_confidence'."
    )
    compute: Compute
    timing_ms: Timing


class BatchClassifyResponse(BaseModel):
    model: str
    model_version: str
    outputs: list[ClassifyResponse] = Field(..., description="One per input, in input order.")


class ExpertDescription(BaseModel):
    name: str
    modalities: list[str] = Field(..., description="What a request must carry for this expert to run.")
    components: list[str] = Field(..., description="Its own components, in execution order.")
    madds: int = Field(..., description="Multiply-adds of its own components per sample.")
    path_madds: int = Field(
        ..., description="A request taking this path with both modalities: encoders + router + own."
    )


class ExampleDescription(BaseModel):
    id: str = Field(..., description="The sample's id in the data set it was taken from.")
    kind: str | None = Field(None, description="Its case kind (e.g. text_sufficient), when the data set has kinds.")
    text: str = Field(..., description="The paired text.")
    label: str | None = Field(None, description="The true label, when the data set has one.")
    image_url: str = Field(..., description="Where the image file is served (GET, same API key as this call).")


class ModelDescription(BaseModel):
    name: str
    version: str
    labels: list[str]
    experts: list[ExpertDescription]
    full_expert: str
    router: dict = Field(
        ...,
        description="The served router: component, lambda, the confidence floor served with it (min_confidence), "
        "MAdds, score and importance order.",
    )
    routes: list[str] = Field(..., description="Accepted values of a request's route: auto, soft, or an expert.")
    operating_points: list[dict] = Field(
        ...,
        description="Every router as a point on the accuracy/compute curve (validation accuracy, MAdds per sample, "
        "saved ratio, route mix), cheapest first; 'default' marks the one requests get when they name none.",
    )
    default_operating_point: str
    default_min_confidence: float | None = Field(
        None,
        description="The confidence floor requests that name no operating point and set no min_confidence get: "
        "DYNFUSE_MIN_CONFIDENCE, else the one the store serves with its default point (router.min_confidence); "
        "None: the router's picks alone.",
    )
    degrade_to: str | None = Field(None, description="The cheaper point served under load (None: never).")
    madds_full: int
    backend: str
    device: str
    preprocessing: dict
    evaluation: dict = Field(..., description="Figures measured at training time (accuracy, compute saved).")
    safety: dict = Field(
        ...,
        description="Is routing still safe, in the process that answered: the guard (state, served and safer "
        "policy, validated and recent agreement with the full path), the shadow audits so far, the drift of each "
        "operating point's route mix from validation, and the thresholds of 'uncertain'.",
    )
    examples: list[ExampleDescription] = Field(
        default_factory=list, description="Image-text pairs shipped with the model, a few per case kind."
    )


class ModelList(BaseModel):
    models: list[ModelDescription]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
