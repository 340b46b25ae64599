"""The served model as a model of the Open Inference Protocol (KServe v2), whichever transport carries the
protocol: HTTP (``service/api/routes/v2.py``: JSON and binary tensor data) and gRPC (``service/grpc/``). Each
binding turns its wire format into ``InputTensor``s and request parameters and calls ``infer``; what is checked,
what runs and what comes out is decided here, once, for both.

The model as a v2 model (model metadata lists the same):

- inputs ``image`` BYTES [N] (encoded image files: PNG, JPEG, ...) and ``text`` BYTES [N] (UTF-8);
- request parameters ``route`` ('auto', 'soft' or an expert's name), ``threshold`` (0..1),
  ``operating_point`` (a router of the model), ``min_confidence`` (0..1) and ``explain`` (boolean), as in /v1; a
  number may also come as a string holding it (KServe's gRPC InferParameter has no double);
- outputs ``label`` BYTES [N], ``probabilities`` FP32 [N, K] (columns in the order of the metadata's
  ``labels``), ``expert`` BYTES [N], ``decided_by`` BYTES [N] (router | threshold | request |
  missing_modality, as /v1's route.decided_by), ``importance`` FP32 [N, 2] (text, image),
  ``modality_weights`` FP32 [N, 2] (text, image: /v1's route.modality_weights), ``shapley`` FP32 [N, 2] (only with
  the request parameter ``explain``: /v1's explanation.shapley), ``madds`` INT64 [N], ``saved_ratio`` FP32 [N],
  ``operating_point`` BYTES [N] (the router that decided), ``degraded`` and
  ``guarded`` BOOL [N] (/v1's route.degraded and route.guarded: a cheaper point under load, the guard's safer
  policy), ``uncertain`` BOOL [N] and ``uncertain_reason`` BYTES [N] (/v1's: out_of_distribution or
  low_confidence, empty when the answer is not uncertain).

Missing modality: leave the input tensor out for a modality no row has; an element of zero length (or a blank
text) is a missing modality for that row alone, as /v1's blank text. A row needs one of the two; when both
tensors are sent their N must match. ``priority`` and ``timeout`` (Triton's scheduling hints) are accepted and
ignored: one FIFO micro-batcher serves everything. Any other unknown parameter is refused, so that a typo is not
silently ignored.

Every row goes through InferenceService.prepare (the /v1 limits and checks) and the one micro-batcher, so v2
requests of either transport batch with /v1 requests and count in the same metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import metadata

import numpy as np

from export.pipeline import AUTO, SOFT, PipelineInput
from models.attribution import MODALITIES
from service.api.v2_codec import check_parameters
from service.batcher import BatchResult
from service.config import Settings
from service.decode import decode_base64, is_blank
from service.errors import ApiError, InvalidInput, NotFound, NotReady, PayloadTooLarge
from service.inference import ClientInput, InferenceService

SERVER_NAME = "dynfuse"
PLATFORM = "dynfuse"
INPUTS = ("image", "text")
OUTPUT_DATATYPES = {
    "label": "BYTES",
    "probabilities": "FP32",
    "expert": "BYTES",
    "decided_by": "BYTES",
    "importance": "FP32",
    "modality_weights": "FP32",
    "shapley": "FP32",
    "madds": "INT64",
    "saved_ratio": "FP32",
    "operating_point": "BYTES",
    "degraded": "BOOL",
    "guarded": "BOOL",
    "uncertain": "BOOL",
    "uncertain_reason": "BYTES",
}
# The request parameters of either transport; HTTP adds binary_data_output (the binary tensor data extension).
REQUEST_PARAMETERS = frozenset(
    {"route", "threshold", "operating_point", "min_confidence", "explain", "priority", "timeout"}
)
# The protocol answers a bad request with 400: the input errors /v1 answers with 415 (not an image) or 422
# (invalid field) are 400 here. 413, 401, 404 and 503 keep their meaning.
V2_STATUS = {415: 400, 422: 400}

try:
    SERVER_VERSION = metadata.version("dynfuse")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0+unknown"


@dataclass
class InputTensor:
    """One input tensor as a binding read it: its header, and its elements read only once the header passed."""

    name: str
    datatype: str
    shape: Sequence[int]
    elements: Callable[[], list[str] | list[bytes]]  # row-major: str from JSON data, bytes from binary data


def as_v2(error: ApiError) -> ApiError:
    """The error with the protocol's status (400 for a bad request of any kind)."""
    error.status = V2_STATUS.get(error.status, error.status)
    return error


# -- health and metadata -----------------------------------------------------------------------
def server_ready(repository) -> bool:
    """Some model answers inference (as /readyz; each model's own readiness is ``model_ready``)."""
    served = [] if repository.starting else repository.models.values()
    return any(service.batcher.ready for service in served)


def model_ready(repository, name: str, version: str | None) -> bool:
    """Whether ``name`` (at ``version``, when given) answers inference now; NotFound for a model or version that
    is not served and is not loading."""
    service: InferenceService | None = repository.models.get(name)
    if service is None:
        # While it loads the name is known (the store's layout), the version is not.
        starting = name == repository.default and (repository.starting or repository.state.load_error)
        if not starting:
            with contextlib.suppress(NotReady):  # loading: not ready yet
                repository.serving(name)  # NotFound for a model neither served nor loading
        return False
    check_model(service, name, version)
    return service.batcher.ready


def check_model(service: InferenceService, name: str, version: str | None) -> None:
    model = service.model
    if name != model.name:
        raise NotFound(f"unknown model {name!r}; this server serves {model.name!r}")
    if version is not None and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r} here; the served version is {model.version!r}")


def describe(service: InferenceService, name: str, version: str | None) -> dict:
    """The model metadata: name, versions, platform, inputs, outputs, and (beyond the protocol) the labels."""
    check_model(service, name, version)
    model = service.model
    per_modality = [-1, len(MODALITIES)]
    shapes = {"probabilities": [-1, len(model.labels)], "importance": per_modality, "modality_weights": per_modality,
              "shapley": per_modality}  # fmt: skip
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in INPUTS],
        "outputs": [
            {"name": n, "datatype": datatype, "shape": shapes.get(n, [-1])} for n, datatype in OUTPUT_DATATYPES.items()
        ],
        "labels": list(model.labels),
    }


# -- inference ---------------------------------------------------------------------------------
async def infer(
    service: InferenceService,
    settings: Settings,
    parameters: dict,
    tensors: list[InputTensor],
    deadline: float | None,
    accepted: frozenset[str] = REQUEST_PARAMETERS,
) -> tuple[dict, Callable[[], None]]:
    """decode -> batch -> predict -> unbatch: every output's values for the rows of ``tensors``, by output name
    (BYTES outputs as lists of str, numeric ones as arrays, batch axis first), and what the binding calls once the
    answer has been sent (the service's audits of the answers: never before, so that an audit delays none).
    Raises an ApiError with the protocol's status for any client mistake."""
    try:
        options = _options(service, parameters, accepted)
        images, texts = _rows(tensors, settings.max_batch_inputs)
        clients = [ClientInput(image, text, **options) for image, text in zip(images, texts, strict=True)]
        items = await _prepare(service, clients)
        results = await service.classify(items, deadline)
    except ApiError as error:
        raise as_v2(error) from None
    values = _output_values(service, results)
    return values, partial(service.after_response, items, results)


def available_outputs(parameters: dict, requested: list[str]) -> list[str]:
    """The outputs a request may select: every one, but ``shapley`` only for an explained request (it has no value
    otherwise; asking for it without ``explain`` is a client mistake, said so)."""
    if _explain(parameters):
        return list(OUTPUT_DATATYPES)
    if "shapley" in requested:
        raise InvalidInput("output 'shapley' needs the request parameter explain: true")
    return [name for name in OUTPUT_DATATYPES if name != "shapley"]


def _explain(parameters: dict) -> bool:
    explain = parameters.get("explain", False)
    if not isinstance(explain, bool):
        raise InvalidInput(f"parameter explain: {explain!r} is not true or false")
    return explain


def _options(service: InferenceService, parameters: dict, accepted: frozenset[str]) -> dict:
    """The request parameters route, threshold, operating_point, min_confidence and explain, checked once for the
    batch, as ClientInput's fields."""
    check_parameters("request", parameters, accepted)
    route = parameters.get("route", AUTO)
    if not isinstance(route, str) or (route not in (AUTO, SOFT) and route not in service.pipeline.experts):
        raise InvalidInput(
            f"parameter route: {route!r} is not 'auto', 'soft' or one of: {', '.join(service.pipeline.experts)}"
        )
    point = parameters.get("operating_point")
    if point is not None and (not isinstance(point, str) or point not in service.model.operating_points):
        raise InvalidInput(
            f"parameter operating_point: {point!r} is not one of: {', '.join(service.model.operating_points)}"
        )
    return {
        "route": route,
        "threshold": _unit(parameters, "threshold"),
        "operating_point": point,
        "min_confidence": _unit(parameters, "min_confidence"),
        "explain": _explain(parameters),
    }


def _unit(parameters: dict, name: str) -> float | None:
    """A request parameter holding a number in [0, 1], or None when it is absent."""
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, str):  # KServe's gRPC parameters have no double: a fraction travels as a string there
        try:
            value = float(value)
        except ValueError:
            raise InvalidInput(f"parameter {name}: {value!r} is not a number in [0, 1]") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"parameter {name}: {value!r} is not a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise InvalidInput(f"parameter {name}: {value} is outside [0, 1]")
    return float(value)


def _rows(tensors: list[InputTensor], max_rows: int) -> tuple[list[bytes | None], list[str | None]]:
    """Per row: the image file's bytes and the text, None where that modality is missing."""
    elements: dict[str, list] = {}
    for tensor in tensors:
        if tensor.name not in INPUTS:
            raise InvalidInput(f"unknown input {tensor.name!r}; this model takes 'image' and 'text', BYTES [N]")
        if tensor.name in elements:
            raise InvalidInput(f"input {tensor.name!r} is sent twice")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype!r}; send BYTES")
        shape = list(tensor.shape)
        if len(shape) != 1 or shape[0] <= 0:
            raise InvalidInput(f"input {tensor.name!r}: shape {shape} is not [N]: one element per row, N >= 1")
        if shape[0] > max_rows:
            raise PayloadTooLarge(f"input {tensor.name!r}: {shape[0]} rows is over the limit of {max_rows}")
        values = tensor.elements()
        if len(values) != shape[0]:  # a binding reads at most one element past the shape
            sent = f"more than {shape[0]}" if len(values) > shape[0] else str(len(values))
            raise InvalidInput(f"input {tensor.name!r}: shape {shape} holds {shape[0]} element(s) but {sent} were sent")
        elements[tensor.name] = values
    if not elements:
        raise InvalidInput("send at least one of the inputs 'image' and 'text' (leave out only a missing modality)")
    counts = {name: len(values) for name, values in elements.items()}
    if len(set(counts.values())) > 1:
        raise InvalidInput(f"the inputs disagree on N: image has {counts['image']} rows, text {counts['text']}")
    n = next(iter(counts.values()))
    images = [_image(row, e) for row, e in enumerate(elements.get("image", [None] * n))]
    texts = [_text(row, e) for row, e in enumerate(elements.get("text", [None] * n))]
    return images, texts


def _image(row: int, element: str | bytes | None) -> bytes | None:
    if not element:  # left out, b"" or "": a missing image for this row
        return None
    if isinstance(element, str):
        return decode_base64(element, field=f"image[{row}] (JSON images are base64 strings)")
    return element


def _text(row: int, element: str | bytes | None) -> str | None:
    if isinstance(element, bytes):
        try:
            return element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"text[{row}]: not valid UTF-8") from None
    return element  # blank counts as missing: InferenceService.prepare decides, as for /v1


async def _prepare(service: InferenceService, clients: list[ClientInput]) -> list[PipelineInput]:
    items = []
    for row, client in enumerate(clients):
        if client.image is None and (client.text is None or is_blank(client.text)):
            raise InvalidInput(f"row {row} has neither an image nor a text (an empty element is a missing modality)")
        try:
            items.append(await service.prepare(client))
        except ApiError as error:
            error.message = f"row {row}: {error.message}"
            raise
    return items


def _output_values(service: InferenceService, results: list[BatchResult]) -> dict:
    outputs = [result.output for result in results]
    reasons = [result.uncertain_reason for result in results]
    madds = np.array([o.madds for o in outputs], dtype=np.int64)  # (N,)
    return {
        "label": [o.label for o in outputs],
        "probabilities": np.stack([o.probabilities for o in outputs]),  # (N, K), columns in model.labels order
        "expert": [o.expert for o in outputs],
        "decided_by": [o.decided_by for o in outputs],
        "importance": np.stack([o.importance for o in outputs]),  # (N, 2): text, image
        "modality_weights": np.stack([o.modality_weights for o in outputs]),  # (N, 2): text, image
        "shapley": np.stack([_shapley(o.explanation) for o in outputs]).astype(np.float32),  # (N, 2)
        "madds": madds,
        "saved_ratio": 1.0 - madds / service.model.madds_full,  # (N,)
        "operating_point": [o.operating_point for o in outputs],
        "degraded": np.array([o.degraded for o in outputs], dtype=bool),
        "guarded": np.array([o.guarded for o in outputs], dtype=bool),
        "uncertain": np.array([r is not None for r in reasons], dtype=bool),
        "uncertain_reason": [r or "" for r in reasons],
    }


def _shapley(explanation: dict | None) -> np.ndarray:
    """(2,) text, image Shapley values of an explained answer (zeros for one not explained: never sent)."""
    if explanation is None:
        return np.zeros(2)
    return np.array([explanation["shapley"]["text"], explanation["shapley"]["image"]])
