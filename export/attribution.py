"""Attribution at serving time: each answer's ``importance``, and on request (``explain``) its exact Shapley values.

NumPy only (the math is models/attribution.py's). ``model.json`` says per expert how its answers are attributed
(written at export from what training decided, models/attribution_training.py):

- ``one_modality``: the expert reads one modality, which gets importance 1; nothing runs.
- ``exact``: the expert's fusion components run again on the request's own inputs, once with the image removed
  and once with the text removed (``explain_madds``); v(neither) is a constant of the model.
- ``head``: a small distilled component (``attribution.<expert>``) answers the same two questions from pooled
  copies of the fusion components' inputs, for a fraction of their cost; ``explain`` still runs them exactly.

Where the expert's inputs live decides where this runs: ``coalition_logits`` is called by whatever executes the
expert's chain (``export/execution.py`` in one process, the expert's own deployment on Ray), and the pipeline
turns the logits into figures (``Attributor``), so both engines give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from export.store import StoredModel, StoreError
from models import attribution
from models.attribution import BOTH, COALITIONS, IMAGE_ONLY, MODALITIES, NEITHER, TEXT_ONLY

ONE_MODALITY, EXACT, HEAD, UNAVAILABLE = "one_modality", "exact", "head", "unavailable"
METHODS = (ONE_MODALITY, EXACT, HEAD)
# What a request asks of an expert's side, as bit flags per row: the default estimate by the head, the exact values.
WANT_HEAD, WANT_EXACT = 1, 2
# The rows an expert's side returns per request: its logits, then (text only, image only) by the head and exactly.
RETURNED = ("logits", "head_text_only", "head_image_only", "exact_text_only", "exact_image_only")


@dataclass(frozen=True)
class ExpertAttribution:
    expert: str
    method: str  # one of METHODS, or UNAVAILABLE for a model exported before attribution existed
    modalities: tuple[str, ...]
    neither: np.ndarray | None = None  # (K,) log-probabilities of v(neither)
    components: tuple[str, ...] = ()  # the fusion components, rerun for each coalition
    absent: dict[str, dict] = field(default_factory=dict)  # modality -> tensor -> the value that stands for it
    head: str | None = None  # the distilled component, for method head
    madds: int = 0  # what the default estimate costs per request
    explain_madds: int = 0  # what the exact values cost per request

    @property
    def reads_both(self) -> bool:
        return len(self.modalities) == 2


def read_attribution(model: StoredModel) -> dict[str, ExpertAttribution]:
    """Each expert's attribution, from model.json (a StoreError names what is malformed)."""
    entries = model.manifest.get("attribution", {}).get("experts", {})
    found = {}
    for expert in model.experts:
        entry = entries.get(expert.name)
        if entry is None:
            method = ONE_MODALITY if len(expert.modalities) == 1 else UNAVAILABLE
            found[expert.name] = ExpertAttribution(expert.name, method, tuple(expert.modalities))
            continue
        try:
            info = ExpertAttribution(
                expert=expert.name,
                method=entry["method"],
                modalities=tuple(m for m in MODALITIES if m in entry["modalities"]),
                neither=np.asarray(entry["neither"], np.float64) if "neither" in entry else None,
                components=tuple(entry.get("components", ())),
                absent={m: dict(v) for m, v in entry.get("absent", {}).items()},
                head=entry.get("head"),
                madds=int(entry["madds"]),
                explain_madds=int(entry["explain_madds"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{model.path}: attribution of expert {expert.name} is malformed: {error}") from error
        _check(model, info)
        found[expert.name] = info
    return found


def _check(model: StoredModel, info: ExpertAttribution) -> None:
    problems = []
    if info.method not in METHODS:
        problems.append(f"method {info.method!r} is not one of {METHODS}")
    if info.neither is None or info.neither.shape != (len(model.labels),):
        problems.append(f"neither needs {len(model.labels)} log-probabilities")
    if info.reads_both:
        missing = [c for c in (*info.components, info.head or "") if c and c not in model.components]
        if missing or not info.components:
            problems.append(f"components {missing or 'none'} not in the model")
        if set(info.absent) != set(MODALITIES):
            problems.append("absent needs the representation of each modality")
        if info.method == HEAD and info.head is None:
            problems.append("method head names no head")
    if problems:
        raise StoreError(f"{model.path}: attribution of expert {info.expert}: " + "; ".join(problems))


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def coalition_logits(
    model: StoredModel,
    info: ExpertAttribution,
    runner: Callable[[str], Runner],
    gather: Callable[[str], np.ndarray],  # a fusion input for the rows asked, from what the chain produced
    how: str,  # EXACT or HEAD
) -> np.ndarray:
    """(n, 2, K): the expert's logits with the image removed (text only) and with the text removed (image only)."""
    components = (info.head,) if how == HEAD else info.components
    produced = {t.name for c in components for t in model.components[c].outputs}
    needed = dict.fromkeys(t.name for c in components for t in model.components[c].inputs if t.name not in produced)
    base = {name: gather(name) for name in needed}
    n = len(next(iter(base.values())))
    if how == HEAD:
        return runner(info.head)(base)["coalition_logits"]
    shapes = {t.name: (t.shape[1:], t.dtype) for c in components for t in model.components[c].inputs}
    doubled = {}
    for name, value in base.items():
        rows = [value, value]
        for k, removed in enumerate(("image", "text")):  # first half: text only; second: image only
            if name in info.absent[removed]:
                shape, dtype = shapes[name]
                rows[k] = attribution.absent(info.absent[removed][name], n, value.shape[1:] or shape, np.dtype(dtype))
        doubled[name] = np.concatenate(rows)
    for component in components:
        doubled.update(runner(component)(doubled))
    logits = doubled["logits"]
    return np.stack([logits[:n], logits[n:]], axis=1)


@dataclass
class Answer:
    """One request's answer, as attribution sees it: the experts mixed into it and the label."""

    label: int
    experts: list[str]  # one, or (soft fusion) every expert that ran
    weights: np.ndarray  # each one's weight in the mixture (1.0 for one expert)
    probabilities: list[np.ndarray]  # each one's (K,) probabilities with both modalities
    coalitions: list[dict[str, np.ndarray]]  # each one's (2, K) logits by HEAD / EXACT, as computed


@dataclass
class Attributed:
    importance: np.ndarray  # (2,) text, image
    method: str  # how the importance was computed
    explanation: dict | None = None


class Attributor:
    """Turns what the experts' side computed into each answer's importance and explanation."""

    def __init__(self, model: StoredModel):
        self.model = model
        self.experts = read_attribution(model)

    def wants(self, expert: str, explain: bool) -> int:
        """The flags (WANT_HEAD, WANT_EXACT) a request answered by ``expert`` asks of the expert's side."""
        info = self.experts[expert]
        if not info.reads_both:
            return 0
        flags = WANT_EXACT if info.method == EXACT else WANT_HEAD if info.method == HEAD else 0
        return flags | (WANT_EXACT if explain else 0)

    def can_explain(self, expert: str) -> bool:
        """False for every expert of a model exported before attribution existed: it lacks the experts'
        v(neither), which even a one-modality expert's exact values need."""
        info = self.experts[expert]
        return info.method != UNAVAILABLE and info.neither is not None

    def default_method(self, experts: list[str]) -> str:
        methods = {self.experts[e].method for e in experts}
        if UNAVAILABLE in methods:
            return UNAVAILABLE
        return methods.pop() if len(methods) == 1 else "mixture"

    def attribute(self, answer: Answer, explain: bool, fallback_weights: np.ndarray | None = None) -> Attributed:
        """The answer's importance (each modality's share of what raised its label's log-probability) and, when
        asked, the exact values. ``fallback_weights``: DRDF's modality weights, for a model exported before
        attribution existed (its answers by an expert of two modalities, alone or in a soft mixture, report them:
        a mixture of attributions and router weights would be neither)."""
        method = self.default_method(answer.experts)
        if method == UNAVAILABLE:
            return Attributed(np.asarray(fallback_weights, np.float32), method, None)
        per_expert = []
        parts = zip(answer.experts, answer.probabilities, answer.coalitions, strict=True)
        for expert, probabilities, computed in parts:
            info = self.experts[expert]
            if info.method == ONE_MODALITY:
                per_expert.append(attribution.one_modality(info.modalities, 1)[0])
            else:
                pair = computed[EXACT if info.method == EXACT else HEAD]
                values = self._values(info, probabilities, pair, answer.label)
                per_expert.append(attribution.shares(attribution.shapley(values[None]))[0])
        explanation = self.explain(answer) if explain else None
        return Attributed(self._mix(answer, per_expert), method, explanation)

    def attribute_all(
        self, answers: list[Answer], explain: np.ndarray, fallback_weights: np.ndarray
    ) -> list[Attributed]:
        """``attribute`` of each answer of a batch, with the same figures: the common answers (one expert, no
        explanation asked, its coalition logits there) take their importance from a few NumPy calls per batch
        instead of a dozen per answer (bench/pipeline_cost.py: ~15 us a pair); every other answer (soft fusion,
        explain, a model exported before attribution, a missing coalition) goes through ``attribute`` itself."""
        out: list[Attributed | None] = [None] * len(answers)
        one_modality: dict[str, list[int]] = {}  # expert -> its rows
        computed: list[int] = []  # rows of an exact or head expert whose coalition logits are there
        for i, answer in enumerate(answers):
            if len(answer.experts) != 1 or explain[i]:
                continue
            info = self.experts[answer.experts[0]]
            if info.method == ONE_MODALITY:
                one_modality.setdefault(info.expert, []).append(i)
            elif info.method in (EXACT, HEAD) and answer.coalitions[0][info.method] is not None:
                computed.append(i)
        for expert, rows in one_modality.items():
            importance = attribution.one_modality(self.experts[expert].modalities, len(rows))
            for k, i in enumerate(rows):
                out[i] = Attributed(importance[k], ONE_MODALITY, None)
        if computed:
            infos = [self.experts[answers[i].experts[0]] for i in computed]
            labels = np.array([answers[i].label for i in computed])
            pairs = np.stack([answers[i].coalitions[0][info.method] for i, info in zip(computed, infos, strict=True)])
            picked = np.array([float(answers[i].probabilities[0][answers[i].label]) for i in computed])
            values = np.empty((len(computed), 4))  # v(S) in COALITIONS order, as _values makes them one by one
            values[:, 0] = np.log(np.maximum(picked, 1e-30))
            values[:, 1:3] = attribution.log_softmax(pairs.astype(np.float64), axis=2)[
                np.arange(len(computed)), :, labels
            ]
            values[:, 3] = [info.neither[answers[i].label] for i, info in zip(computed, infos, strict=True)]
            importance = attribution.shares(attribution.shapley(values))
            for k, (i, info) in enumerate(zip(computed, infos, strict=True)):
                out[i] = Attributed(importance[k], info.method, None)
        return [
            done if done is not None else self.attribute(answers[i], bool(explain[i]), fallback_weights[i])
            for i, done in enumerate(out)
        ]

    def _values(self, info: ExpertAttribution, probabilities, pair: np.ndarray, label: int) -> np.ndarray:
        """(4,) v(S) of one expert and label, from its probabilities and its (2, K) coalition logits (NaN when
        they are missing: an expert deployment that did not answer, whose requests get its error instead)."""
        if pair is None:
            return np.full(4, np.nan)
        both = np.log(max(float(probabilities[label]), 1e-30))
        singles = attribution.log_softmax(np.asarray(pair, np.float64), axis=1)[:, label]
        return np.array([both, singles[0], singles[1], info.neither[label]])

    @staticmethod
    def _mix(answer: Answer, per_expert: list[np.ndarray]) -> np.ndarray:
        """One expert's importance, or for soft fusion each expert's weighted by its part in the label's
        probability (w_e p_e(label))."""
        if len(per_expert) == 1:
            return np.asarray(per_expert[0], np.float32)
        share = np.array([w * p[answer.label] for w, p in zip(answer.weights, answer.probabilities, strict=True)])
        share = share / share.sum() if share.sum() > 0 else np.full(len(share), 1.0 / len(share))
        return (share[:, None] * np.stack(per_expert)).sum(axis=0).astype(np.float32)

    def explain(self, answer: Answer) -> dict:
        """The exact two-player Shapley values of log p(label) over {text, image}, for the answer as served (a
        soft fusion's mixture with its weights held)."""
        mixed = np.zeros((len(COALITIONS), len(self.model.labels)))
        for expert, weight, probabilities, computed in zip(
            answer.experts, answer.weights, answer.probabilities, answer.coalitions, strict=True
        ):
            info = self.experts[expert]
            mixed += weight * self._coalition_probabilities(info, probabilities, computed.get(EXACT))
        values = np.log(np.clip(mixed[:, answer.label], 1e-30, None))
        phi = attribution.shapley(values[None])[0]
        shares = attribution.shares(phi[None])[0]
        return {
            "shapley": {m: round(float(v), 6) for m, v in zip(MODALITIES, phi, strict=True)},
            "importance": {m: round(float(v), 6) for m, v in zip(MODALITIES, shares, strict=True)},
            "log_prob": {c: round(float(v), 6) for c, v in zip(COALITIONS, values, strict=True)},
            # What the answer would have been with a modality removed (ERASER's comprehensiveness reads these).
            "labels": {c: str(self.model.labels[int(mixed[k].argmax())]) for k, c in enumerate(COALITIONS) if k},
        }

    @staticmethod
    def _coalition_probabilities(info: ExpertAttribution, probabilities, exact_pair) -> np.ndarray:
        """(4, K) the expert's probabilities under each coalition. A one-modality expert answers as it does
        when its modality is there, else with the training labels' frequencies (its v(neither))."""
        out = np.empty((len(COALITIONS), len(probabilities)))
        out[BOTH] = probabilities
        out[NEITHER] = np.exp(info.neither)
        if info.reads_both:
            pair = np.full((2, len(probabilities)), np.nan) if exact_pair is None else exact_pair
            out[[TEXT_ONLY, IMAGE_ONLY]] = attribution.softmax(np.asarray(pair, np.float64), axis=1)
        else:
            present = info.modalities[0]
            out[TEXT_ONLY] = probabilities if present == "text" else out[NEITHER]
            out[IMAGE_ONLY] = probabilities if present == "image" else out[NEITHER]
        return out
