"""What each modality did for an answer: two-player Shapley values over {text, image}.

NumPy only: training, export and the serving pipeline all call these functions, so the figures a response
reports are those the benchmark and the tests check.

The game. For the expert that answered and the label it returned, ``v(S)`` is the expert's log-probability of that
label when only the modalities in S are present (S one of both, text only, image only, neither). A removed
modality is given to the expert the way it was trained to see it missing (``ABSENT`` below). Then

    phi_text  = 1/2 [(v(text only) - v(neither)) + (v(both) - v(image only))]
    phi_image = 1/2 [(v(image only) - v(neither)) + (v(both) - v(text only))]

and phi_text + phi_image = v(both) - v(neither) (efficiency), phi_m = 0 for a modality the expert never reads
(dummy), equal values for modalities that play the same part (symmetry).

``importance`` normalizes them into shares that sum to 1: each modality's share of what raised the answer's
log-probability, ``max(phi_m, 0) / (max(phi_text, 0) + max(phi_image, 0))``. A modality that argued against
the answer gets 0: it did not decide it. In the rare answer that neither raised (both values <= 0), the shares
follow the size of each value, and both are 0.5 when both are 0. An expert that reads one modality gives it 1.

How a missing modality is represented (``ABSENT``). An expert's chain runs the components that read one
modality alone (the shared text encoder, the image trunk and encoder, ...) and then its fusion components, from
the first one that reads both modalities to the end. A removed modality is zeros in every tensor its own
encoders would have handed to the fusion components: ``token_ids`` all padding (0), ``text_tokens`` and
``text_features`` zeros, the image features (``image_mid``, ``image_features``, ``image_map``) zeros. That is
what the serving pipeline already feeds for a request without text (export/pipeline.py), and what Stage I
shows every two-modality expert on a share of its rows (models/attribution_training.py), so ``v(text only)`` and
``v(image only)`` are the expert's trained answers to a missing modality, not extrapolations. ``v(neither)`` is
the same for every request (all inputs are the representation), so it is computed once, at export. A user's
expert (models/byo) declares its own representation, tensor by tensor.

For a one-modality expert there is one player: its own modality's value is ``v(both) - v(neither)`` with
``v(neither)`` the log of the label's share of the training data (what any expert knows from no input at all),
and the other modality's value is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("text", "image")
COALITIONS = ("both", "text_only", "image_only", "neither")  # the order of v(S) everywhere
BOTH, TEXT_ONLY, IMAGE_ONLY, NEITHER = range(len(COALITIONS))
REMOVED = {TEXT_ONLY: "image", IMAGE_ONLY: "text"}  # the modality a one-modality coalition removes
# Raw request tensors and the modality each comes from. A spec tensor (``input_ids@hf32-…``) is named after one.
RAW_MODALITY = {
    "token_ids": "text",
    "input_ids": "text",
    "attention_mask": "text",
    "image": "image",
    "thumbnail": "image",
}
ABSENT = 0  # the value of every element of a removed modality's tensors, for the built-in experts
TIE = 1e-9  # Shapley values smaller than this count as 0 when normalizing


class AttributionError(ValueError):
    """An expert whose answers cannot be attributed (a missing-modality representation lacking, a chain that
    never reads one of its declared modalities)."""


@dataclass(frozen=True)
class FusionPlan:
    """How to ask one expert what it answers with a modality removed."""

    expert: str
    modalities: tuple[str, ...]  # what the expert reads
    components: tuple[str, ...]  # its fusion components: rerun for each coalition (empty for a one-modality expert)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # modality -> tensors replaced when removed

    @property
    def reads_both(self) -> bool:
        return len(self.modalities) == 2


def raw_modality(name: str) -> str | None:
    """The modality a raw request tensor comes from (``input_ids@key`` as ``input_ids``), None if unknown."""
    return RAW_MODALITY.get(name.split("@", 1)[0])


def plan_fusion(
    expert: str,
    modalities: Sequence[str],
    chain: Sequence[str],
    inputs_of: Mapping[str, Sequence[str]],
    outputs_of: Mapping[str, Sequence[str]],
    modality_of_raw: Callable[[str], str | None] = raw_modality,
) -> FusionPlan:
    """The fusion components of an expert's chain and the tensors each modality hands them.

    ``inputs_of`` / ``outputs_of`` cover every component of the model (the shared encoders produce tensors the
    chain reads). A tensor's modalities are those of the raw inputs it was computed from."""
    producers = {out: name for name, outs in outputs_of.items() for out in outs}
    memo: dict[str, frozenset[str]] = {}

    def modalities_of(tensor: str) -> frozenset[str]:
        if tensor not in memo:
            producer = producers.get(tensor)
            if producer is None:
                found = modality_of_raw(tensor)
                memo[tensor] = frozenset({found} if found else ())
            else:
                memo[tensor] = frozenset().union(*(modalities_of(i) for i in inputs_of[producer]))
        return memo[tensor]

    def reads(component: str) -> frozenset[str]:
        return frozenset().union(*(modalities_of(i) for i in inputs_of[component]))

    modalities = tuple(m for m in MODALITIES if m in modalities)
    if len(modalities) < 2:
        return FusionPlan(expert, modalities, ())
    unread = [m for m in modalities if not any(m in reads(c) for c in chain)]
    if unread:
        raise AttributionError(f"expert {expert}: it declares {' and '.join(unread)} but no component reads it")
    start = next((k for k, c in enumerate(chain) if reads(c) >= set(modalities)), None)
    if start is None:
        raise AttributionError(f"expert {expert}: no component of its chain {list(chain)} reads both modalities")
    components = tuple(chain[start:])
    produced_inside = {out for c in components for out in outputs_of[c]}
    outside = dict.fromkeys(i for c in components for i in inputs_of[c] if i not in produced_inside)
    inputs = {m: tuple(t for t in outside if modalities_of(t) == frozenset({m})) for m in modalities}
    return FusionPlan(expert, modalities, components, inputs)


def absent(value: float | Sequence, rows: int, shape: Sequence[int], dtype) -> np.ndarray:
    """``rows`` copies of a removed modality's tensor: a number filled in, or one sample's values repeated."""
    sample = np.broadcast_to(np.asarray(value, dtype=dtype), tuple(shape))
    return np.broadcast_to(sample, (rows, *shape)).copy()


def label_log_probs(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p(label) of (N, C, K) coalition probabilities: (N, C), finite however small the probability."""
    picked = np.take_along_axis(probabilities, labels[:, None, None], axis=2)[:, :, 0]
    return np.log(np.clip(picked, 1e-30, None))


def shapley(values: np.ndarray) -> np.ndarray:
    """(N, 2) text, image Shapley values from (N, 4) v(S) in ``COALITIONS`` order."""
    values = np.asarray(values, np.float64)
    both, text_only, image_only, neither = (values[:, k] for k in range(4))
    text = 0.5 * ((text_only - neither) + (both - image_only))
    image = 0.5 * ((image_only - neither) + (both - text_only))
    return np.stack([text, image], axis=1)


def shares(phi: np.ndarray) -> np.ndarray:
    """(N, 2) importance from (N, 2) Shapley values: each modality's share of what raised the answer (module
    docstring); rows sum to 1."""
    phi = np.asarray(phi, np.float64)
    positive = np.clip(phi, 0.0, None)
    total = positive.sum(axis=1, keepdims=True)
    size = np.abs(phi)
    size_total = size.sum(axis=1, keepdims=True)
    by_size = np.where(size_total > TIE, size / np.where(size_total > TIE, size_total, 1.0), 0.5)
    out = np.where(total > TIE, positive / np.where(total > TIE, total, 1.0), by_size)
    return out.astype(np.float32)


def one_modality(modalities: Iterable[str], rows: int) -> np.ndarray:
    """(rows, 2) importance of an expert that reads one modality: 1 for it, 0 for the other."""
    reads = [m in tuple(modalities) for m in MODALITIES]
    assert sum(reads) == 1, f"one_modality of an expert that reads {list(modalities)}"
    return np.tile(np.asarray(reads, np.float32), (rows, 1))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
