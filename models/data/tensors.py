"""Turn manifest samples into training tensors with the serving preprocessing (tokenizer + image transform)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from models.data.manifest import Sample, load_image_rgb
from models.preprocess import ImagePreprocessing, to_unit_array
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
    """Every sample's picture as float32 in [0, 1], shape (N, S, S, 3). Errors name the manifest line."""
    pixels = np.empty((len(samples), image_size, image_size, 3), dtype=np.float32)
    for i, sample in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False)):
        pixels[i] = to_unit_array(load_image_rgb(sample), image_size)
    return pixels


def tensorize(
    samples: list[Sample],
    pixels: np.ndarray,
    tokenizer: Tokenizer,
    preprocessing: ImagePreprocessing,
    labels: list[str],
) -> TensorSplit:
    # Same arithmetic as ImagePreprocessing.__call__, on the whole split at once.
    normalized = (pixels - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
    label_index = {label: i for i, label in enumerate(labels)}
    kinds = [s.kind for s in samples]
    return TensorSplit(
        token_ids=torch.tensor([tokenizer.encode(s.text) for s in samples], dtype=torch.int64),
        images=torch.from_numpy(np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))),
        labels=torch.tensor([label_index[s.label] if s.label is not None else -1 for s in samples], dtype=torch.int64),
        ids=[s.id for s in samples],
        kinds=kinds if all(k is not None for k in kinds) else None,
    )
