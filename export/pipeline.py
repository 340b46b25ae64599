"""The dynamic pipeline over a stored model: preprocess -> shared encoders -> router -> policy -> experts.

NumPy, Pillow and a backend only (no torch for ONNX). On a batch it runs the text encoder on the
requests that have text, the glimpse on those with an image, the router on all, decides one expert
per request (models/policy.py), then runs each chosen expert once on its own sub-batch: the image
encoder runs only inside experts that use it, and only for the requests routed there.
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
        self._needs = np.array([[m in e.modalities for m in ("text", "image")] for e in model.experts])  # (E, 2)
        # The batch tensors each expert reads: its sub-batch slices only those (copying images for the
        # text expert would cost more than the expert itself).
        self._reads = {e.name: _external_inputs(model, e.components) for e in model.experts}

    def runner(self, component: str) -> Runner:
        """The loaded component (loaded on first use: evaluation asks for routers the server never runs)."""
        if component not in self._runners:
            self._runners[component] = self.backend.load(self.model.components[component])
        return self._runners[component]

    # -- preprocessing -------------------------------------------------------------------------
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

    def encode_glimpse(self, images: np.ndarray) -> np.ndarray:
        return self.runner(self._glimpse)({"image": images})["glimpse_features"]

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

        tensors = {
            "token_ids": _stack([x.token_ids for x in inputs], has_text, (self.model.tokenizer.max_tokens,), np.int64),
            "image": self.images_tensor(
                _stack([x.image for x in inputs], has_image, _pixel_shape(self.model), np.uint8)
            ),
            **{name: np.zeros((n, *shape), np.float32) for name, shape in self._text_outputs.items()},
            "glimpse_features": np.zeros((n, self._glimpse_dim), np.float32),
        }
        if has_text.any():
            for name, value in self.encode_text(tensors["token_ids"][has_text]).items():
                tensors[name][has_text] = value
        if has_image.any():
            tensors["glimpse_features"][has_image] = self.encode_glimpse(tensors["image"][has_image])
        scores, importance = self.route(tensors["text_features"], tensors["glimpse_features"], has_text, has_image)

        eligible = (~self._needs[None, :, 0] | has_text[:, None]) & (~self._needs[None, :, 1] | has_image[:, None])
        forced = np.array([NOT_FORCED if x.route == AUTO else self.experts.index(x.route) for x in inputs])
        thresholds = np.array([np.nan if x.threshold is None else x.threshold for x in inputs], dtype=np.float64)
        choice, decided_by = decide_routes(
            scores, self.full_index, forced=forced, thresholds=thresholds, eligible=eligible
        )

        probabilities = np.empty((n, len(self.labels)), np.float32)
        seconds: dict[str, float] = {}
        for expert_index in np.unique(choice):
            members = np.flatnonzero(choice == expert_index)
            expert = self.experts[expert_index]
            started = time.perf_counter()
            logits = self.run_expert(expert, {name: tensors[name][members] for name in self._reads[expert]})
            seconds[expert] = time.perf_counter() - started
            probabilities[members] = softmax(logits)

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
        vocab = self.model.tokenizer.vocab_size
        for batch_size in batch_sizes:
            for expert in (*self.experts, AUTO):
                inputs = [
                    PipelineInput(
                        token_ids=rng.integers(2, vocab, self.model.tokenizer.max_tokens).astype(np.int64),
                        image=rng.integers(0, 256, _pixel_shape(self.model), dtype=np.uint8),
                        route=expert,
                    )
                    for _ in range(batch_size)
                ]
                self.predict(inputs)


def _external_inputs(model: StoredModel, components: tuple[str, ...]) -> tuple[str, ...]:
    """Inputs of a chain of components that no earlier component of the chain produces."""
    produced: set[str] = set()
    needed: list[str] = []
    for name in components:
        info = model.components[name]
        needed += [t.name for t in info.inputs if t.name not in produced and t.name not in needed]
        produced |= {t.name for t in info.outputs}
    return tuple(needed)


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
