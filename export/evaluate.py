"""``dynfuse evaluate``: the policy table of a stored model, computed by the served components.

Every expert and every router of the store run on the whole split through the same pipeline and
preprocessing the server uses; the policies are then applied to those outputs (models/evaluation.py),
so each row is what the server would do with that policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from export.backends import create_backend
from export.pipeline import DynamicPipeline, softmax
from export.store import load_model
from models.data.manifest import check_labels, load_image_rgb, read_split
from models.evaluation import RoutingOutputs, evaluate_policies


def evaluate_store(
    store: Path,
    name: str | None,
    data_dir: Path,
    *,
    split: str = "test",
    version: str | None = None,
    backend: str = "onnx",
    device: str = "cpu",
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[list[dict], RoutingOutputs]:
    model = load_model(store, name, version)
    pipeline = DynamicPipeline(model, create_backend(backend, device))
    samples = read_split(Path(data_dir), split)
    check_labels(samples, list(model.labels))
    label_index = {label: i for i, label in enumerate(model.labels)}
    routers = [(r["component"], r["lambda"]) for r in model.manifest["routers"]]

    probs: dict[str, list[np.ndarray]] = {e: [] for e in model.expert_names}
    scores: dict[str, list[np.ndarray]] = {component: [] for component, _ in routers}
    importance: dict[str, list[np.ndarray]] = {component: [] for component, _ in routers}
    weights: dict[str, list[np.ndarray]] = {component: [] for component, _ in routers}
    batches = range(0, len(samples), batch_size)
    for start in tqdm(batches, desc=f"evaluate {split}", disable=not progress):
        batch = samples[start : start + batch_size]
        token_ids = np.stack([pipeline.prepare_text(s.text) for s in batch])
        images = [load_image_rgb(s) for s in batch]
        pixels = np.stack([pipeline.prepare_image(image) for image in images])
        tensors = {
            "token_ids": token_ids,
            "image": pipeline.images_tensor(pixels),
            **pipeline.encode_text(token_ids),
            "glimpse_features": pipeline.encode_glimpse(pixels),
        }
        if model.specs:  # experts with their own preprocessing: each spec over the whole batch
            spec_images = [model.specs.prepare_image(image) for image in images]
            tensors |= pipeline.spec_tensors(
                [s.text for s in batch], np.stack(spec_images) if model.specs.decode_side else None
            )
        present = np.ones(len(batch), dtype=bool)
        for component, _ in routers:
            routed = pipeline.route(tensors["text_features"], tensors["glimpse_features"], present, present, component)
            scores[component].append(routed[0])
            importance[component].append(routed[1])
            weights[component].append(routed[2])
        for expert in model.expert_names:
            probs[expert].append(softmax(pipeline.run_expert(expert, tensors)))

    kinds = [s.kind for s in samples]
    outputs = RoutingOutputs(
        labels=np.array([label_index[s.label] for s in samples]),
        expert_probs={e: np.concatenate(p) for e, p in probs.items()},
        router_scores={c: np.concatenate(s) for c, s in scores.items()},
        router_importance={c: np.concatenate(i) for c, i in importance.items()},
        router_weights={c: np.concatenate(w) for c, w in weights.items()},
        temperatures={p.component: p.temperature for p in model.operating_points.values()},
        shared_madds=sum(model.components[c].madds for c in model.shared_encoders.values())
        + model.components[model.router].madds,
        component_madds={name: info.madds for name, info in model.components.items()},
        expert_components={e.name: e.components for e in model.experts},
        routers=[{"name": c, "lambda": lam} for c, lam in routers],
        default_router=model.router,
        default_min_confidence=model.default_min_confidence,
        experts=list(model.expert_names),
        path_madds={e.name: e.path_madds for e in model.experts},
        static_madds={e["name"]: e["static_madds"] for e in model.manifest["experts"]},
        madds_full=model.madds_full,
        full_expert=model.full_expert,
        kinds=kinds if all(k is not None for k in kinds) else None,
        extra={"model": model.name, "version": model.version, "backend": pipeline.backend.describe()},
    )
    return evaluate_policies(outputs), outputs
