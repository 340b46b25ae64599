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

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.backends import Backend, Runner
from export.store import StoredModel
from models.policy import DECIDED_BY, NOT_FORCED, decide_routes

AUTO = "auto"


class RouteError(ValueError):
    """A request asks for a route the model cannot take (unknown expert, or a modality it lacks)."""


@dataclass
class PipelineInput:
    token_ids: np.ndarray | None  # (T,) int64, from prepare_text; None when the request has no text
    image: np.ndarray | None  # (S, S, 3) uint8, from prepare_image; None when it has no image
    route: str = AUTO  # "auto" or an expert's name
    threshold: float | None = None  # escalate to the full path when the router's pick scores below this
    # Kept only for a model whose experts bring their own preprocessing (``model.specs``), from ``prepare``:
    text: str | None = None  # the raw text, for the experts' tokenizers
    spec_image: np.ndarray | None = None  # (L, L, 3) uint8, L the largest side the experts' image specs read


@dataclass
class PipelineOutput:
    label: str
    probabilities: np.ndarray  # (K,) of the expert that ran
    expert: str
    decided_by: str  # router | threshold | request | missing_modality
    route_scores: np.ndarray  # (E,) the router's normalized scores
    importance: np.ndarray  # (2,) text, image
    madds: int  # what this request executed


class DynamicPipeline:
    def __init__(self, model: StoredModel, backend: Backend):
        self.model = model
        self.backend = backend
        self._runners: dict[str, Runner] = {}
        served = set(model.shared_encoders.values()) | {model.router}
        served |= {c for e in model.experts for c in e.components}
        for name in sorted(served):
            self.runner(name)
        self.experts = model.expert_names
        self.full_index = self.experts.index(model.full_expert)
        self.labels = np.asarray(model.labels)
        self._text_encoder = model.shared_encoders["text"]
        self._glimpse = model.shared_encoders["image"]
        # The shared encoders' outputs, with their per-sample shapes: zeros stand in for a missing modality.
        self._text_outputs = {t.name: t.shape[1:] for t in model.components[self._text_encoder].outputs}
        self._glimpse_dim = model.components[self._glimpse].outputs[0].shape[-1]
        self._glimpse_side = model.components[self._glimpse].inputs[0].shape[-1]
        self._needs = np.array([[m in e.modalities for m in ("text", "image")] for e in model.experts])  # (E, 2)
        self._chains = {e.name: e.components for e in model.experts}
        self._inputs = {name: tuple(t.name for t in info.inputs) for name, info in model.components.items()}
        # Every expert component in an order that runs producers first: chains are ordered, so the order of
        # first appearance over all chains is one.
        self._component_order = tuple(dict.fromkeys(c for e in model.experts for c in e.components))
        # Inputs made lazily, per batch, for the rows that read them: the full-resolution image and each spec's.
        self._lazy_sources = {"image": "image"} | model.specs.source_of
        finals = [e.components[-1] for e in model.experts]
        assert len(set(finals)) == len(finals), f"two experts end in the same component: {finals}"

    def runner(self, component: str) -> Runner:
        """The loaded component (loaded on first use: evaluation asks for routers the server never runs)."""
        if component not in self._runners:
            self._runners[component] = self.backend.load(self.model.components[component])
        return self._runners[component]

    # -- preprocessing -------------------------------------------------------------------------
    def prepare(
        self, text: str | None, image: Image.Image | None, route: str = AUTO, threshold: float | None = None
    ) -> PipelineInput:
        """One request's input, preprocessed: what the router reads, and what the experts' specs need."""
        specs = self.model.specs
        return PipelineInput(
            token_ids=self.prepare_text(text) if text is not None else None,
            image=self.prepare_image(image) if image is not None else None,
            route=route,
            threshold=threshold,
            text=text if specs.keeps_text else None,
            spec_image=specs.prepare_image(image) if image is not None else None,
        )

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
        if route == AUTO:
            return
        if route not in self.experts:
            raise RouteError(f"unknown route {route!r}; use 'auto' or one of: {', '.join(self.experts)}")
        missing = [m for m, present in (("text", has_text), ("image", has_image)) if not present]
        lacking = [m for m in missing if m in self.model.expert(route).modalities]
        if lacking:
            raise RouteError(f"route {route!r} needs {' and '.join(lacking)}, which the request does not carry")

    # -- the stages ----------------------------------------------------------------------------
    def encode_text(self, token_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The text encoder's outputs: the pooled ``text_features`` and the per-word ``text_tokens``."""
        return self.runner(self._text_encoder)({"token_ids": token_ids})

    def encode_glimpse(self, pixels: np.ndarray) -> np.ndarray:
        """The glimpse's features of uint8 (N, S, S, 3) pixels, from their thumbnails."""
        thumbnails = self.model.preprocessing.thumbnail(pixels, self._glimpse_side)
        return self.runner(self._glimpse)({"thumbnail": thumbnails})["glimpse_features"]

    def route(self, text_features, glimpse_features, text_present, image_present, router: str | None = None):
        """Router scores (N, E) and modality importance (N, 2)."""
        out = self.runner(router or self.model.router)(
            {
                "text_features": text_features,
                "glimpse_features": glimpse_features,
                "text_present": text_present.astype(np.float32),
                "image_present": image_present.astype(np.float32),
            }
        )
        return out["expert_scores"], out["importance"]

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
        scores, importance = self.route(tensors["text_features"], tensors["glimpse_features"], has_text, has_image)

        eligible = (~self._needs[None, :, 0] | has_text[:, None]) & (~self._needs[None, :, 1] | has_image[:, None])
        forced = np.array([NOT_FORCED if x.route == AUTO else self.experts.index(x.route) for x in inputs])
        thresholds = np.array([np.nan if x.threshold is None else x.threshold for x in inputs], dtype=np.float64)
        choice, decided_by = decide_routes(
            scores, self.full_index, forced=forced, thresholds=thresholds, eligible=eligible
        )

        probabilities, seconds = self._run_experts(choice, tensors, pixels, inputs)
        shared_madds = self._shared_madds(has_text, has_image)
        outputs = [
            PipelineOutput(
                label=str(self.labels[probabilities[i].argmax()]),
                probabilities=probabilities[i],
                expert=self.experts[choice[i]],
                decided_by=DECIDED_BY[decided_by[i]],
                route_scores=scores[i],
                importance=importance[i],
                madds=int(shared_madds[i] + self.model.experts[choice[i]].madds),
            )
            for i in range(n)
        ]
        assert len(outputs) == n, f"pipeline produced {len(outputs)} outputs for {n} inputs"
        return outputs, seconds

    def _run_experts(
        self, choice: np.ndarray, tensors: dict, pixels: np.ndarray, inputs: list[PipelineInput]
    ) -> tuple[np.ndarray, dict]:
        """Probabilities (n, K) from each request's chosen expert, and the seconds each expert took.

        Each component runs once, on the requests of every chosen expert whose chain has it; a component's
        time is shared among those experts in proportion to their requests. What a component produces is
        kept for its own rows only: a consumer's rows are always among its producer's."""
        n = len(choice)
        members = {self.experts[i]: np.flatnonzero(choice == i) for i in np.unique(choice)}
        rows_of: dict[str, np.ndarray] = {}
        for expert, rows in members.items():
            for component in self._chains[expert]:
                rows_of[component] = np.union1d(rows_of.get(component, rows), rows)
        produced: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tensor -> (its rows, its values for them)
        # The full-resolution image and each spec are made only for the requests whose expert reads them, once.
        readers: dict[str, list[np.ndarray]] = {}  # "image" or a spec key -> the rows of the components reading it
        for component, rows in rows_of.items():
            for source in {self._lazy_sources.get(name) for name in self._input_names(component)} - {None}:
                readers.setdefault(source, []).append(rows)
        for source, row_sets in readers.items():
            rows = np.unique(np.concatenate(row_sets))
            for name, values in self._preprocess(source, rows, pixels, inputs).items():
                produced[name] = (rows, values)

        def gather(name: str, rows: np.ndarray) -> np.ndarray:
            if name not in produced:
                return tensors[name][rows]
            source_rows, values = produced[name]
            return values if len(source_rows) == len(rows) else values[np.searchsorted(source_rows, rows)]

        probabilities = np.empty((n, len(self.labels)), np.float32)
        seconds = dict.fromkeys(members, 0.0)
        for component in self._component_order:
            rows = rows_of.get(component)
            if rows is None:
                continue
            started = time.perf_counter()
            outputs = self.runner(component)({name: gather(name, rows) for name in self._input_names(component)})
            elapsed = time.perf_counter() - started
            for expert, expert_rows in members.items():
                if component in self._chains[expert]:
                    seconds[expert] += elapsed * len(expert_rows) / len(rows)
            for name, value in outputs.items():
                if name == "logits":  # an expert's last component: its rows are that expert's requests
                    probabilities[rows] = softmax(value)
                else:
                    produced[name] = (rows, value)
        return probabilities, seconds

    def _preprocess(self, source: str, rows: np.ndarray, pixels: np.ndarray, inputs: list[PipelineInput]) -> dict:
        """The tensors of one lazy source for ``rows``: the model's normalized image, or one spec's tensors."""
        if source == "image":
            return {"image": self.images_tensor(pixels[rows])}
        spec = self.model.specs.specs[source]
        if spec.kind == "image":
            spec_images = np.stack([inputs[i].spec_image for i in rows])  # type: ignore[misc]
            return self.model.specs.apply(source, None, spec_images)
        return self.model.specs.apply(source, [inputs[i].text for i in rows], None)  # type: ignore[misc]

    def _input_names(self, component: str) -> tuple[str, ...]:
        return self._inputs[component]

    def _shared_madds(self, has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
        components = self.model.components
        return (
            has_text * components[self._text_encoder].madds
            + has_image * components[self._glimpse].madds
            + components[self.model.router].madds
        )

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """Run every served path once per batch size, so the first real request pays no start-up cost."""
        rng = np.random.default_rng(0)
        tokenizer, specs = self.model.tokenizer, self.model.specs
        for batch_size in batch_sizes:
            for expert in (*self.experts, AUTO):
                inputs = []
                for _ in range(batch_size):
                    words = rng.integers(2, tokenizer.vocab_size, tokenizer.max_tokens)
                    text = " ".join(tokenizer.vocab[i] for i in words)
                    side = specs.decode_side
                    inputs.append(
                        PipelineInput(
                            token_ids=np.asarray(tokenizer.encode(text), dtype=np.int64),
                            image=rng.integers(0, 256, _pixel_shape(self.model), dtype=np.uint8),
                            route=expert,
                            text=text if specs.keeps_text else None,
                            spec_image=rng.integers(0, 256, (side, side, 3), dtype=np.uint8) if side else None,
                        )
                    )
                self.predict(inputs)


def _pixel_shape(model: StoredModel) -> tuple[int, int, int]:
    size = model.preprocessing.image_size
    return (size, size, 3)


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
