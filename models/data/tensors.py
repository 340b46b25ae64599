"""Turn manifest samples into training tensors with the serving preprocessing (tokenizer + image transform)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from models.data.manifest import Sample, load_image_rgb
from models.preprocess import ImagePreprocessing, to_pixels
from models.tokenizer import Tokenizer


@dataclass
class TensorSplit:
    token_ids: torch.Tensor  # (N, T) int64
    images: torch.Tensor  # (N, 3, S, S) float32, normalized
    labels: torch.Tensor  # (N,) int64; -1 for an unlabelled sample
    ids: list[str]
    kinds: list[str] | None  # the synthetic benchmark's sample kinds, when the manifest has them

    def __len__(self) -> int:
        return len(self.ids)


def load_pixels(samples: list[Sample], image_size: int, *, progress: bool = False, desc: str = "images") -> np.ndarray:
    """Every sample's picture resized, as uint8 of shape (N, S, S, 3), what the server's decoder hands on.
    Errors name the manifest line."""
    pixels = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False)):
        pixels[i] = to_pixels(load_image_rgb(sample), image_size)
    return pixels


def tensorize(
    samples: list[Sample],
    pixels: np.ndarray,
    tokenizer: Tokenizer,
    preprocessing: ImagePreprocessing,
    labels: list[str],
) -> TensorSplit:
    label_index = {label: i for i, label in enumerate(labels)}
    kinds = [s.kind for s in samples]
    return TensorSplit(
        token_ids=torch.tensor([tokenizer.encode(s.text) for s in samples], dtype=torch.int64),
        images=torch.from_numpy(preprocessing.normalize(pixels)),  # exactly as the server normalizes
        labels=torch.tensor([label_index[s.label] if s.label is not None else -1 for s in samples], dtype=torch.int64),
        ids=[s.id for s in samples],
        kinds=kinds if all(k is not None for k in kinds) else None,
    )
