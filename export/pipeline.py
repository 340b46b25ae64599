"""The dynamic pipeline over a stored model: preprocess -> shared encoders -> router -> policy -> experts.

NumPy, Pillow and a backend only (no torch for ONNX). On a batch it runs the text encoder on the
requests that have text, the glimpse on those with an image, the router on all, decides one expert
per request (models/policy.py), then runs the chosen experts: every component once, on the requests
routed to an expert whose chain has it. A component several experts share (the CNN's trunk) runs
once on the union of their requests instead of once per expert; the image encoder never runs for a
request routed to an expert that does not use it, and the full-resolution image is normalized only
for the requests whose expert reads it.

Experts that bring their own preprocessing (models/specs.py: an image size with its mean and std, a tokenizer
file) read tensors named ``<input>@<spec key>``. Like the full-resolution image, each spec is applied once per
batch, to the rows of every chosen expert that reads it, from what the request kept: its picture at the largest
side any spec needs, and its raw text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.attribution import EXACT, HEAD, Answer, Attributor
from export.backends import Backend, Runner
from export.execution import IMAGE_SOURCE, BatchExecution
from export.store import StoredModel
from models.ood import MAP_TENSOR
from models.policy import CONFIDENCE, DECIDED_BY, NOT_FORCED, REQUEST, calibrate, confidence_fallback, decide_routes

AUTO = "auto"
SOFT = "soft"  # DRDF's expert fusion: every eligible expert runs, mixed by the router's fused weights


class RouteError(ValueError):
    """A request asks for a route the model cannot take (unknown expert, or a modality it lacks)."""


@dataclass
class PipelineInput:
    token_ids: np.ndarray | None  # (T,) int64, from prepare_text; None when the request has no text
    image: np.ndarray | None  # (S, S, 3) uint8, from prepare_image; None when it has no image
    route: str = AUTO  # "auto", "soft" or an expert's name
    threshold: float | None = None  # escalate to the full path when the router's calibrated pick scores below this
    operating_point: str | None = None  # which router decides; None: the model's default
    min_confidence: float | None = None  # run the full path too when a cheaper expert's top probability is below
    degraded: bool = False  # the server chose a cheaper operating point under load (passed through to the output)
    explain: bool = False  # also compute the exact Shapley values of the answer (export/attribution.py)
    guarded: bool = False  # the server's guard chose a safer policy for it (passed through to the output)
    # Kept only for a model whose experts bring their own preprocessing (``model.specs``):
    text: str | None = None  # the raw text, for the experts' tokenizers
    spec_image: np.ndarray | None = None  # (L, L, 3) uint8, L the largest side the experts' image specs read


@dataclass
class PipelineOutput:
    label: str
    probabilities: np.ndarray  # (K,) of the expert that ran
    expert: str
    decided_by: str  # router | threshold | request | missing_modality | confidence
    route_scores: np.ndarray  # (E,) the router's calibrated scores
    modality_weights: np.ndarray  # (2,) text, image: DRDF's modal weights, how decisive each router was
    importance: np.ndarray  # (2,) text, image: each modality's share of what raised the answer's log-probability
    madds: int  # what this request executed, its attribution included
    operating_point: str  # the router that decided
    weights: np.ndarray | None = None  # (E,) soft fusion's weight per expert (0 for an ineligible one)
    fallback_from: str | None = None  # the cheaper expert whose answer the confidence fallback replaced
    fallback_label: str | None = None  # that expert's answer (what a shadow audit of the router's pick compares)
    degraded: bool = False  # served at a cheaper operating point because the server was under load
    importance_method: str = ""  # one_modality | exact | head | mixture | unavailable (export/attribution.py)
    attribution_madds: int = 0  # the part of madds spent on importance and explanation
    explanation: dict | None = None  # explain=true: the exact Shapley values, their shares and the four log p
    guarded: bool = False  # served under the guard's safer policy
    confidence: float = 1.0  # the answering path's top probability, calibrated on validation (models/safety.py)
    ood_pvalue: float = 1.0  # how typical the input's features are of validation data (models/ood.py); 1: no density


class DynamicPipeline:
    def __init__(self, model: StoredModel, backend: Backend):
        self.model = model
        self.backend = backend
        self._runners: dict[str, Runner] = {}
        for name in sorted(self.served_components()):
            self.runner(name)
        self.experts = model.expert_names
        self.full_index = self.experts.index(model.full_expert)
        self.path_madds = np.array([e.path_madds for e in model.experts], dtype=np.int64)  # (E,)
        self.labels = np.asarray(model.labels)
        self._text_encoder = model.shared_encoders["text"]
        self._glimpse = model.shared_encoders["image"]
        # The shared encoders' outputs, with their per-sample shapes: zeros stand in for a missing modality.
        self._text_outputs = {t.name: t.shape[1:] for t in model.components[self._text_encoder].outputs}
        self._glimpse_dim = model.components[self._glimpse].outputs[0].shape[-1]
        self._glimpse_side = model.components[self._glimpse].inputs[0].shape[-1]
        self._needs = np.array([[m in e.modalities for m in ("text", "image")] for e in model.experts])  # (E, 2)
        finals = [e.components[-1] for e in model.experts]
        assert len(set(finals)) == len(finals), f"two experts end in the same component: {finals}"
        self._madds_cache: dict[frozenset, int] = {}
        self.attributor = Attributor(model)

    def served_components(self) -> set[str]:
        """The components this process runs, loaded at start: the shared encoders, the router and every expert's
        chain (a distributed pipeline runs the experts elsewhere and loads only the first two)."""
        served = set(self.model.shared_encoders.values()) | {self.model.router}
        return served | {c for e in self.model.experts for c in e.components}

    def execution(
        self, tensors: dict[str, np.ndarray], pixels: np.ndarray, inputs: list[PipelineInput]
    ) -> BatchExecution:
        """What runs the experts of one batch: here, in this process (service/ray/ sends them to their own
        deployments instead, with the same ``run(members)``)."""
        return BatchExecution(
            self.model, self.runner, tensors, self._preprocessor(pixels, inputs), self.attributor.experts
        )

    def runner(self, component: str) -> Runner:
        """The loaded component (loaded on first use: evaluation asks for routers the server never runs)."""
        if component not in self._runners:
            self._runners[component] = self.backend.load(self.model.components[component])
        return self._runners[component]

    # -- preprocessing -------------------------------------------------------------------------
    def prepare(self, text: str | None, image: Image.Image | None, **options) -> PipelineInput:
        """One request's input, preprocessed: what the router reads, and what the experts' specs need."""
        pixels, spec_pixels = self.prepare_images(image) if image is not None else (None, None)
        return PipelineInput(
            token_ids=self.prepare_text(text) if text is not None else None,
            image=pixels,
            text=text if self.model.specs.keeps_text else None,
            spec_image=spec_pixels,
            **options,
        )

    @property
    def decode_side(self) -> int:
        """The largest side anything reads of a picture: the router's and built-in experts', or a spec's."""
        return max(self.model.preprocessing.image_size, self.model.specs.decode_side or 0)

    def prepare_images(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's pixels and, when its experts bring image specs, the pixels at the specs' decode side."""
        return self.prepare_image(image), self.model.specs.prepare_image(image)

    def prepare_text(self, text: str) -> np.ndarray:
        return np.asarray(self.model.tokenizer.encode(text), dtype=np.int64)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """Resized pixels; normalization happens once per batch, in ``predict`` (``images_tensor``)."""
        return self.model.preprocessing.pixels(image)

    def images_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) from prepare_image -> the image components' float32 (N, 3, S, S) input."""
        return self.model.preprocessing.normalize(pixels)

    def check_route(self, route: str, has_text: bool, has_image: bool) -> None:
        """Raise RouteError when a request's route cannot run; the service answers 422."""
        if route in (AUTO, SOFT):
            return
        if route not in self.experts:
            raise RouteError(f"unknown route {route!r}; use 'auto', 'soft' or one of: {', '.join(self.experts)}")
        missing = [m for m, present in (("text", has_text), ("image", has_image)) if not present]
        lacking = [m for m in missing if m in self.model.expert(route).modalities]
        if lacking:
            raise RouteError(f"route {route!r} needs {' and '.join(lacking)}, which the request does not carry")

    def check_explain(self, route: str, explain: bool) -> None:
        """Raise RouteError when an explanation is asked of a model that cannot give one."""
        if not explain:
            return
        experts = self.experts if route in (AUTO, SOFT) else (route,)
        unavailable = [e for e in experts if not self.attributor.can_explain(e)]
        if unavailable:
            raise RouteError(
                f"explain: this model version was exported before attribution existed ({', '.join(unavailable)} "
                "cannot be explained); export it again with this dynfuse, or leave explain out"
            )

    def check_operating_point(self, name: str | None) -> None:
        """Raise RouteError for an operating point the model does not have (None: the default)."""
        if name is not None and name not in self.model.operating_points:
            points = ", ".join(self.model.operating_points)
            raise RouteError(f"unknown operating_point {name!r}; this model has: {points}")

    # -- the stages ----------------------------------------------------------------------------
    def encode_text(self, token_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The text encoder's outputs: the pooled ``text_features`` and the per-word ``text_tokens``."""
        return self.runner(self._text_encoder)({"token_ids": token_ids})

    def encode_glimpse(self, pixels: np.ndarray) -> np.ndarray:
        """The glimpse's features of uint8 (N, S, S, 3) pixels, from their thumbnails."""
        thumbnails = self.model.preprocessing.thumbnail(pixels, self._glimpse_side)
        return self.runner(self._glimpse)({"thumbnail": thumbnails})["glimpse_features"]

    def route(self, text_features, glimpse_features, text_present, image_present, router: str | None = None):
        """Router scores (N, E, uncalibrated), DRDF's modality weights (N, 2) and fused weights (N, E)."""
        out = self.runner(router or self.model.router)(
            {
                "text_features": text_features,
                "glimpse_features": glimpse_features,
                "text_present": text_present.astype(np.float32),
                "image_present": image_present.astype(np.float32),
            }
        )
        return out["expert_scores"], out["importance"], out["expert_weights"]

    def spec_tensors(self, texts: list[str] | None, spec_images: np.ndarray | None) -> dict[str, np.ndarray]:
        """Every spec's tensors for a batch in which every row has both modalities (evaluation)."""
        specs = self.model.specs
        return {name: value for key in specs.specs for name, value in specs.apply(key, texts, spec_images).items()}

    def run_expert(self, expert: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """The expert's logits (n, K); ``tensors`` holds the raw inputs and shared features of its sub-batch."""
        available = dict(tensors)
        for component in self.model.expert(expert).components:
            available.update(self.runner(component)(available))
        return available["logits"]

    # -- the whole path ------------------------------------------------------------------------
    def predict(self, inputs: list[PipelineInput]) -> tuple[list[PipelineOutput], dict[str, float]]:
        """One output per input, in order, and the seconds each expert's sub-batch took."""
        n = len(inputs)
        assert n > 0, "predict needs at least one input"
        has_text = np.array([x.token_ids is not None for x in inputs])
        has_image = np.array([x.image is not None for x in inputs])
        assert (has_text | has_image).all(), "every input needs text or an image"
        for x in inputs:
            self.check_route(x.route, x.token_ids is not None, x.image is not None)
            self.check_operating_point(x.operating_point)
            self.check_explain(x.route, x.explain)

        pixels = _stack([x.image for x in inputs], has_image, _pixel_shape(self.model), np.uint8)
        tensors = {
            "token_ids": _stack([x.token_ids for x in inputs], has_text, (self.model.tokenizer.max_tokens,), np.int64),
            **{name: np.zeros((n, *shape), np.float32) for name, shape in self._text_outputs.items()},
            "glimpse_features": np.zeros((n, self._glimpse_dim), np.float32),
        }
        if has_text.any():
            for name, value in self.encode_text(tensors["token_ids"][has_text]).items():
                tensors[name][has_text] = value
        if has_image.any():
            tensors["glimpse_features"][has_image] = self.encode_glimpse(pixels[has_image])
        points = [x.operating_point or self.model.default_point for x in inputs]
        scores, modality_weights, weights = self._route_by_point(points, tensors, has_text, has_image)

        eligible = (~self._needs[None, :, 0] | has_text[:, None]) & (~self._needs[None, :, 1] | has_image[:, None])
        soft = np.array([x.route == SOFT for x in inputs])
        forced = np.array([self.experts.index(x.route) if x.route not in (AUTO, SOFT) else NOT_FORCED for x in inputs])
        thresholds = np.array([np.nan if x.threshold is None else x.threshold for x in inputs], dtype=np.float64)
        choice, decided_by = decide_routes(
            scores, self.full_index, path_madds=self.path_madds, forced=forced, thresholds=thresholds, eligible=eligible
        )
        decided_by[soft] = REQUEST  # the client asked for soft fusion; the router's weights do the rest

        execution = self.execution(tensors, pixels, inputs)
        ran = [{self.experts[c]} for c in choice]  # the experts each request runs
        for i in np.flatnonzero(soft):
            ran[i] = {e for e, ok in zip(self.experts, eligible[i], strict=True) if ok}
        explain = np.array([x.explain for x in inputs])
        members = _members(ran, self.experts)
        logits, seconds = execution.run(members, self._wants(members, explain))
        probabilities = self._combine(ran, logits, soft, weights, eligible, choice)

        # The cascade: a cheaper expert unsure of its answer hands the request to the full path too.
        floors = np.array([np.nan if x.min_confidence is None else x.min_confidence for x in inputs], np.float64)
        may_fall_back = (forced == NOT_FORCED) & ~soft & eligible[:, self.full_index]
        top = probabilities.max(axis=1)
        fallback = confidence_fallback(choice, top, self.path_madds, self.full_index, floors) & may_fall_back
        replaced = {}  # row -> the cheaper expert's answer the fallback replaced
        if fallback.any():
            rows = np.flatnonzero(fallback)
            replaced = {int(i): str(self.labels[probabilities[i].argmax()]) for i in rows}
            full = {self.model.full_expert: rows}
            full_logits, more_seconds = execution.run(full, self._wants(full, explain))
            logits[f"{self.model.full_expert}@fallback"] = full_logits[self.model.full_expert]
            probabilities[rows] = softmax(full_logits[self.model.full_expert])
            for expert, value in more_seconds.items():
                seconds[expert] = seconds.get(expert, 0.0) + value
            for i in rows:
                ran[i] = ran[i] | {self.model.full_expert}
            decided_by[rows] = CONFIDENCE

        shared_madds = self._shared_madds(has_text, has_image)
        answering = [SOFT if soft[i] else self.experts[self.full_index if fallback[i] else choice[i]] for i in range(n)]
        confidence = self._calibrated_confidence(probabilities, answering)
        ood_pvalues = self._ood_pvalues(tensors, execution, has_text, has_image)
        label_index = probabilities.argmax(axis=1)
        answers = self._answers(execution.coalitions, members, logits, probabilities, soft, weights, eligible, choice,
                                fallback, label_index)  # fmt: skip
        spent = self._attribution_madds(execution.coalitions, n)
        attributed = self.attributor.attribute_all(answers, explain, modality_weights)
        # Each row's figures as Python values, an array at a time: a NumPy scalar made per row and figure cost more
        # than the rest of building the outputs.
        labels = self.labels[label_index].tolist()
        madds = (shared_madds + np.array([self._experts_madds(r) for r in ran], np.int64) + spent).tolist()
        spent_madds, confidence, ood_pvalues = spent.tolist(), confidence.tolist(), ood_pvalues.tolist()
        how = [DECIDED_BY[d] for d in decided_by.tolist()]
        outputs = [
            PipelineOutput(
                label=labels[i],
                probabilities=probabilities[i],
                expert=answering[i],
                decided_by=how[i],
                route_scores=scores[i],
                modality_weights=modality_weights[i],
                importance=attributed[i].importance,
                madds=madds[i],
                operating_point=points[i],
                weights=_normalized(weights[i], eligible[i]) if soft[i] else None,
                fallback_from=self.experts[choice[i]] if fallback[i] else None,
                fallback_label=replaced.get(i),
                degraded=inputs[i].degraded,
                importance_method=attributed[i].method,
                attribution_madds=spent_madds[i],
                explanation=attributed[i].explanation,
                guarded=inputs[i].guarded,
                confidence=confidence[i],
                ood_pvalue=ood_pvalues[i],
            )
            for i in range(n)
        ]
        assert len(outputs) == n, f"pipeline produced {len(outputs)} outputs for {n} inputs"
        return outputs, seconds

    def _wants(self, members: dict[str, np.ndarray], explain: np.ndarray) -> dict[str, np.ndarray]:
        """What each expert's side must compute for attribution, per row it runs (export/attribution.py)."""
        wants = {}
        for expert, rows in members.items():
            flags = np.array([self.attributor.wants(expert, bool(explain[r])) for r in rows], np.int64)
            if flags.any():
                wants[expert] = flags
        return wants

    def _answers(self, coalitions, members, logits, probabilities, soft, weights, eligible, choice, fallback, labels):
        """Each request's answer as attribution sees it: the experts mixed into it, their probabilities and the
        coalition logits computed for them, and the label returned (``labels``: its index, per request)."""
        full = self.model.full_expert
        position = {expert: {row: k for k, row in enumerate(rows)} for expert, rows in members.items()}
        if fallback.any():
            position[f"{full}@fallback"] = {row: k for k, row in enumerate(np.flatnonzero(fallback))}
        answers = []
        source_probs: dict[str, np.ndarray] = {}  # each source's softmax, made once: row by row it is the same

        def probs_of(source: str, i: int) -> np.ndarray:
            if source not in source_probs:
                source_probs[source] = softmax(logits[source])
            return source_probs[source][position[source][i]]

        for i, label in enumerate(labels.tolist()):
            if soft[i]:
                mixed = _normalized(weights[i], eligible[i])
                experts = [e for e, w in zip(self.experts, mixed, strict=True) if w > 0]
                share = mixed[mixed > 0].astype(np.float64)
            else:
                experts = [full if fallback[i] else self.experts[choice[i]]]
                share = _ONE
            sources = [f"{full}@fallback" if fallback[i] else e for e in experts]
            answers.append(
                Answer(
                    label=label,
                    experts=experts,
                    weights=share,
                    probabilities=[probs_of(s, i) for s in sources],
                    coalitions=[
                        {how: coalitions.get(e, {}).get(how, {}).get(i) for how in (HEAD, EXACT)} for e in experts
                    ],
                )
            )
        return answers

    def _attribution_madds(self, coalitions: dict, n: int) -> np.ndarray:
        """What each request spent on attribution: the heads and exact reruns computed for it."""
        spent = np.zeros(n, np.int64)
        for expert, kinds in coalitions.items():
            info = self.attributor.experts[expert]
            for how, rows in kinds.items():
                spent[list(rows)] += info.madds if how == HEAD else info.explain_madds
        return spent

    def _calibrated_confidence(self, probabilities: np.ndarray, answering: list[str]) -> np.ndarray:
        """(N,) each answer's top probability, temperature-scaled with its expert's validation temperature (soft
        fusion's mixture, and a model exported without temperatures, as they are)."""
        temperatures = self.model.safety.get("expert_temperatures", {})
        confidence = probabilities.max(axis=1).astype(np.float64)
        for expert in set(answering) & set(temperatures):
            rows = np.flatnonzero(np.asarray(answering) == expert)
            confidence[rows] = calibrate(probabilities[rows].astype(np.float64), temperatures[expert]).max(axis=1)
        return confidence

    def _ood_pvalues(self, tensors: dict, execution, has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
        """(N,) out-of-distribution p-values (models/ood.py) on the shared encoders' features, and on the image
        encoder's map for the requests whose path ran it here; 1 without a fitted density."""
        if self.model.ood is None:
            return np.ones(len(has_text))
        image_map = getattr(execution, "produced", {}).get(MAP_TENSOR)  # (rows, values); Ray experts send it back
        rows, values = image_map if image_map is not None else (None, None)
        return self.model.ood.pvalues(
            tensors["text_features"], tensors["glimpse_features"], has_text, has_image, values, rows
        )

    def _preprocessor(self, pixels: np.ndarray, inputs: list[PipelineInput]):
        """What BatchExecution calls to make a lazy source's tensors for some rows: the model's normalized image,
        or one spec's tensors (models/specs.py) from the rows' kept pictures or raw texts."""
        specs = self.model.specs

        def preprocess(source: str, rows: np.ndarray) -> dict[str, np.ndarray]:
            if source == IMAGE_SOURCE:
                return {"image": self.images_tensor(pixels[rows])}
            if specs.specs[source].kind == "image":
                return specs.apply(source, None, np.stack([inputs[i].spec_image for i in rows]))
            return specs.apply(source, [inputs[i].text for i in rows], None)

        return preprocess

    def _route_by_point(self, points: list[str], tensors: dict, has_text, has_image):
        """Scores (calibrated), modality weights and fused weights of each request, from its operating point's
        router."""
        n = len(points)
        scores = np.empty((n, len(self.experts)), np.float32)
        weights = np.empty((n, len(self.experts)), np.float32)
        modality_weights = np.empty((n, 2), np.float32)
        for name in dict.fromkeys(points):
            rows = np.flatnonzero(np.asarray(points) == name)
            point = self.model.operating_points[name]
            routed = self.route(
                tensors["text_features"][rows], tensors["glimpse_features"][rows], has_text[rows], has_image[rows],
                point.component,
            )  # fmt: skip
            scores[rows] = calibrate(routed[0], point.temperature)
            modality_weights[rows], weights[rows] = routed[1], routed[2]
        return scores, modality_weights, weights

    def _combine(self, ran, logits, soft, weights, eligible, choice) -> np.ndarray:
        """Each request's class probabilities: its expert's, or for soft fusion the weighted mixture of every
        eligible expert's probabilities (DRDF's expert fusion unit, over probabilities: experts whose logits
        live on different scales mix on equal terms, and the mixture is itself a distribution)."""
        n = len(ran)
        probabilities = np.zeros((n, len(self.labels)), np.float32)
        position = {
            expert: {row: k for k, row in enumerate(rows)} for expert, rows in _members(ran, self.experts).items()
        }
        expert_probs = {expert: softmax(value) for expert, value in logits.items()}
        for i in range(n):
            if soft[i]:
                w = _normalized(weights[i], eligible[i])
                for e, expert in enumerate(self.experts):
                    if w[e] > 0:
                        probabilities[i] += w[e] * expert_probs[expert][position[expert][i]]
            else:
                expert = self.experts[choice[i]]
                probabilities[i] = expert_probs[expert][position[expert][i]]
        return probabilities

    def _experts_madds(self, experts: set[str]) -> int:
        """What running ``experts`` for one request cost beyond the encoders and the router: each component of
        their chains once."""
        key = frozenset(experts)
        if key not in self._madds_cache:
            components = {c for e in experts for c in self.model.expert(e).components}
            self._madds_cache[key] = sum(self.model.components[c].madds for c in components)
        return self._madds_cache[key]

    def _shared_madds(self, has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
        components = self.model.components
        return (
            has_text * components[self._text_encoder].madds
            + has_image * components[self._glimpse].madds
            + components[self.model.router].madds
        )

    def close(self) -> None:
        """Release what the pipeline holds beyond its runners (nothing here; the Ray engine's pipeline releases its
        version's expert deployments)."""
        return

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """Run every served path once per batch size, and every operating point's router once, so the first real
        request (or the first degraded one) pays no start-up cost."""
        rng = np.random.default_rng(0)
        tokenizer, specs = self.model.tokenizer, self.model.specs
        side = specs.decode_side

        def inputs(batch_size: int, route: str, point: str | None = None) -> list[PipelineInput]:
            made = []
            for _ in range(batch_size):
                words = rng.integers(2, tokenizer.vocab_size, tokenizer.max_tokens)
                text = " ".join(tokenizer.vocab[i] for i in words)
                made.append(
                    PipelineInput(
                        token_ids=np.asarray(tokenizer.encode(text), dtype=np.int64),
                        image=rng.integers(0, 256, _pixel_shape(self.model), dtype=np.uint8),
                        route=route,
                        operating_point=point,
                        text=text if specs.keeps_text else None,
                        spec_image=rng.integers(0, 256, (side, side, 3), dtype=np.uint8) if side else None,
                    )
                )
            return made

        for batch_size in batch_sizes:
            for route in (*self.experts, AUTO):
                self.predict(inputs(batch_size, route))
        for point in self.model.operating_points:
            self.predict(inputs(1, AUTO, point))


_ONE = np.ones(1, np.float64)  # the weight of an answer's one expert, shared by every such answer: never written
_ONE.setflags(write=False)


def _pixel_shape(model: StoredModel) -> tuple[int, int, int]:
    size = model.preprocessing.image_size
    return (size, size, 3)


def _members(ran: list[set[str]], experts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Expert -> the (sorted) requests that run it."""
    rows: dict[str, list[int]] = {}
    for i, chosen in enumerate(ran):
        for expert in chosen:
            rows.setdefault(expert, []).append(i)
    return {e: np.asarray(rows[e]) for e in experts if e in rows}


def _normalized(weights: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Soft fusion's weights: the fused router weights of the eligible experts, summing to 1. When the router
    gives them all (numerically) nothing, as a router that always picks a two-modality expert may for a request
    with one modality, the eligible experts share equally rather than dividing by zero."""
    masked = np.where(eligible, weights, 0.0).astype(np.float64)
    total = masked.sum()
    if not total > 1e-12:
        masked, total = eligible.astype(np.float64), float(eligible.sum())
    return (masked / total).astype(np.float32)


def _stack(items: list, present: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Stack per-request arrays, zeros where absent (those rows never reach a component that reads them)."""
    out = np.zeros((len(items), *shape), dtype=dtype)
    for i in np.flatnonzero(present):
        out[i] = items[i]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
