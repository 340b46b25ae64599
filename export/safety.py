"""At export: what "safe routing" means for this model, measured on its validation split.

models/safety.py computes the figures (each expert's calibration, each operating point's agreement with the
full path, the guard's safer policy) from the validation split's expert outputs and the routers' cross-fitted
scores (stored in the run by training; recomputed here, with the same seeds, for a run that predates them).
models/ood.py fits the out-of-distribution density of the shared encoders' features, written beside the
components as ``ood.npz``. The server reads both from the store (export/store.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.store import sha256_file
from models.byo.model import RouterOnlyModel
from models.data.manifest import has_split, read_split
from models.data.tensors import load_pixels, tensorize
from models.dynamic_fusion import IMAGE_CNN
from models.ood import MAP_TENSOR, fit_detector
from models.preprocess import ImagePreprocessing
from models.router_selection import routing_outputs
from models.safety import measure
from models.specs import SpecSet
from models.tokenizer import Tokenizer
from models.training import TrainConfig, caption_variants, cross_fitted_routes, expert_outputs

OOD_FILE = "ood.npz"


def measure_safety(checkpoint: dict, model, data_dir: Path | None, staging: Path, log) -> dict | None:
    """model.json's ``safety`` section, with ``ood.npz`` written into ``staging``; None (and said) without a
    labelled validation split to measure on."""
    trained_on = Path(checkpoint["data"]["dir"])
    data_dir = Path(data_dir or trained_on)
    if not has_split(data_dir, "val"):
        log(
            f"no validation split in {data_dir}: the model is exported without safety figures (the server's guard "
            "and its 'uncertain' flag stay off for it); pass --data with the training data to add them"
        )
        return None
    samples = read_split(data_dir, "val")
    preprocessing = ImagePreprocessing.from_dict(checkpoint["preprocessing"])
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
    split = tensorize(
        samples, load_pixels(samples, preprocessing.image_size), tokenizer, preprocessing, checkpoint["labels"]
    )
    if isinstance(model, RouterOnlyModel):
        from models.byo.training import cached_outputs

        cache = cached_outputs(model, split, samples, SpecSet(model.specs))
    else:
        cache = expert_outputs(model, split)
    # A run from before either kind of caption variant existed was trained without it.
    config = TrainConfig(**{"stage2_word_dropout": (), "stage2_vocab_dropout": (), **checkpoint["train_config"]})

    same_data = data_dir.resolve() == trained_on.resolve()
    routes = {}
    for entry in checkpoint["routers"]:
        scores = entry.get("validation_scores")
        if scores is None or not same_data or len(scores) != len(split):
            # A run from before the scores were stored, or other data: route it as training did (cross-fitted).
            reworded = config.stage2_word_dropout or config.stage2_vocab_dropout
            if reworded and "augmented" not in cache and not isinstance(model, RouterOnlyModel):
                cache["augmented"] = caption_variants(model, split, config)
            scores = cross_fitted_routes(model, cache, checkpoint["madds"], entry["lambda"], config)["scores"]
        routes[entry["name"]] = {"scores": scores}
    outputs = routing_outputs(
        model=model,
        split=split,
        routers=checkpoint["routers"],
        costs=checkpoint["madds"],
        full_expert=checkpoint["full_expert"],
        outputs=cache,
        routes=routes,
        default_router=checkpoint["default_router"],
        default_min_confidence=checkpoint.get("default_min_confidence"),
    )
    safety = measure(outputs)

    image_map = None if isinstance(model, RouterOnlyModel) else _image_maps(model, split)
    detector = fit_detector(cache["text_features"].numpy(), cache["glimpse_features"].numpy(), image_map, seed=0)
    detector.save(staging / OOD_FILE)
    safety["ood"] = {
        "file": OOD_FILE,
        "sha256": sha256_file(staging / OOD_FILE),
        "views": list(detector.views),
        "fitted_on": {"split": "val", "samples": len(split)},
        "features": ["text_features", "glimpse_features", *([MAP_TENSOR] if image_map is not None else [])],
    }
    served = checkpoint["default_router"]
    point, guard = safety["operating_points"][served], safety["guard"][served]
    floor = checkpoint.get("default_min_confidence")
    served = served if floor is None else f"{served} (confidence floor {floor:g})"
    log(
        f"safety on {len(split)} validation samples: {served} answers {point['cheaper_share']:.1%} on a cheaper path, "
        f"{point['agreement']:.2%} of them as the full path does; the guard's safer policy: {guard['policy']}"
        + (
            f" ({guard['validation']['agreement']:.2%} agreement, {guard['validation']['saved_ratio']:.1%} saved)"
            if guard["policy"]
            else ""
        )
    )
    return safety


@torch.no_grad()
def _image_maps(model, split, batch_size: int = 256) -> np.ndarray | None:
    """The image encoder's maps of a split's pictures, or None for a model without one."""
    if getattr(model, "image_encoder", None) is None:
        return None
    maps = []
    for start in range(0, len(split), batch_size):
        done: dict = {}
        tensors = model.run_components(IMAGE_CNN, {"image": split.images[start : start + batch_size]}, done)
        maps.append(tensors[MAP_TENSOR].numpy())
    return np.concatenate(maps)
