"""What ``dynfuse export`` does differently for a router-only run (models/byo): the rest is export/writer.py's.

The user's components are exported like the built-in ones, each checked against eager PyTorch on random and
real inputs; what differs is where the real inputs come from (each expert's own preprocessing specs, made from
the decoded pictures and raw texts as serving makes them), the tokenizer files that travel with the model, and
the pipeline check, whose eager side runs each expert's chain on its spec tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.pipeline import DynamicPipeline, PipelineInput
from export.store import MODEL_FORMAT_WITH_SPECS, sha256_file
from models.byo.model import RouterOnlyModel
from models.data.manifest import Sample, has_split, load_image_rgb, read_split
from models.data.tensors import TensorSplit, load_pixels, tensorize
from models.encoders import thumbnail
from models.preprocess import ImagePreprocessing
from models.specs import SpecSet
from models.tokenizer import Tokenizer


@dataclass
class CheckSamples:
    """A labelled split of the training data, prepared for the router and for every spec."""

    split: str
    samples: list[Sample]
    tensors: TensorSplit  # the router's inputs (word token ids, images at the router's size)
    pixels: np.ndarray  # uint8 (N, S, S, 3) at the router's size: what the pipeline's glimpse reads
    spec_pixels: np.ndarray | None  # uint8 (N, L, L, 3) at the specs' decode side, None without image specs


def check_samples(checkpoint: dict, model: RouterOnlyModel, data_dir: Path | None, log) -> CheckSamples | None:
    data_dir = Path(data_dir or checkpoint["data"]["dir"])
    if not data_dir.is_dir():
        log(f"training data {data_dir} not found: parity checked on random inputs only (pass --data to add real ones)")
        return None
    split = "test" if has_split(data_dir, "test") else "val"
    samples = read_split(data_dir, split, require_label=False)
    preprocessing = ImagePreprocessing.from_dict(checkpoint["preprocessing"])
    pixels = load_pixels(samples, preprocessing.image_size)
    tensors = tensorize(
        samples, pixels, Tokenizer.from_dict(checkpoint["tokenizer"]), preprocessing, model.config.labels
    )
    side = SpecSet(model.specs).decode_side
    return CheckSamples(split, samples, tensors, pixels, load_pixels(samples, side) if side else None)


def _spec_tensors(model: RouterOnlyModel, texts: list[str], spec_pixels: np.ndarray | None) -> dict:
    specs = SpecSet(model.specs)
    return {
        name: torch.from_numpy(value)
        for key in specs.specs
        for name, value in specs.apply(key, texts, spec_pixels).items()
    }


@torch.no_grad()
def real_component_inputs(model: RouterOnlyModel, checked: CheckSamples, limit: int = 256) -> dict[str, torch.Tensor]:
    """Every tensor a component may read, from real samples: the router's as export/writer.py makes them for the
    built-in models (every combination of present and missing modalities), and each expert's chain on its specs."""
    token_ids, images = checked.tensors.token_ids[:limit], checked.tensors.images[:limit]
    rows = torch.arange(len(token_ids))
    text_present = (rows % 4 != 3).to(torch.float32)
    image_present = (rows % 4 != 2).to(torch.float32)
    text_tokens, text_features = model.text_encoder(token_ids)
    tensors = {
        "token_ids": token_ids,
        "text_tokens": text_tokens,
        "text_features": text_features * text_present[:, None],  # zeros when absent, as served
        "thumbnail": thumbnail(images, model.config.glimpse_size),
        "glimpse_features": model.glimpse(images) * image_present[:, None],
        "text_present": text_present,
        "image_present": image_present,
    }
    texts = [s.text for s in checked.samples[:limit]]
    spec_pixels = checked.spec_pixels[:limit] if checked.spec_pixels is not None else None
    available = _spec_tensors(model, texts, spec_pixels)
    for chain in model.chains.values():
        available = chain._run(available)  # every intermediate output, named as the next component reads it
    return tensors | available


@torch.no_grad()
def eager_batches(
    model: RouterOnlyModel, pipeline: DynamicPipeline, checked: CheckSamples, batch_size: int
) -> Iterator[tuple[list[str], list[int], list[int], list[PipelineInput]]]:
    """(ids, eager expert index, eager label index, pipeline inputs) per batch, for export/writer.py's check."""
    experts = [e.name for e in model.experts]
    for start in range(0, len(checked.samples), batch_size):
        batch = checked.samples[start : start + batch_size]
        tokens = checked.tensors.token_ids[start : start + batch_size]
        scores, _ = model.route(tokens, checked.tensors.images[start : start + batch_size])
        choice = scores.argmax(1).tolist()
        spec_pixels = checked.spec_pixels[start : start + batch_size] if checked.spec_pixels is not None else None
        logits = model.expert_logits(_spec_tensors(model, [s.text for s in batch], spec_pixels))
        labels = [int(logits[experts[c]][i].argmax()) for i, c in enumerate(choice)]
        # The pipeline gets what InferenceService.prepare makes of a request: the same decoded pictures.
        inputs = [pipeline.prepare(s.text, load_image_rgb(s)) for s in batch]
        yield [s.id for s in batch], choice, labels, inputs


def write_spec_files(checkpoint: dict, staging: Path) -> dict[str, dict]:
    """The experts' tokenizer files, written from the run into the version directory; their model.json entries
    (``preprocessing.specs``), each file with its sha256, which the store verifies at load."""
    entries = {}
    for key, entry in checkpoint["specs"].items():
        entry = {k: v for k, v in entry.items() if k != "content"}
        if "tokenizer" in entry:
            path = staging / entry["tokenizer"]
            path.write_text(checkpoint["specs"][key]["content"])
            assert sha256_file(path) == entry["sha256"], f"{path}: not the bytes the router was trained with"
        entries[key] = entry
    return entries


def add_specs(manifest: dict, specs: dict[str, dict]) -> None:
    """The specs in model.json, and the format that tells an older reader it cannot serve them."""
    manifest["format"] = MODEL_FORMAT_WITH_SPECS
    manifest["preprocessing"]["specs"] = specs
