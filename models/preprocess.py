"""Image preprocessing shared by training and serving (Pillow + NumPy, no torch).

Training and the served pipeline call the same function, so an image gives the same tensor in both,
which is what lets the exported model reproduce the evaluation figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class ImagePreprocessing:
    image_size: int  # square side the model was trained at; other sizes are resized (bilinear)
    mean: tuple[float, float, float]  # per-channel mean of the training images, on the 0..1 scale
    std: tuple[float, float, float]  # per-channel standard deviation, likewise

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB picture -> a normalized float32 array of shape (3, S, S)."""
        pixels = to_unit_array(image, self.image_size)  # (S, S, 3)
        normalized = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalized.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> ImagePreprocessing:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: the camera's EXIF orientation applied, alpha and palettes dropped.

    Training data and served requests both pass through here, so a picture means the same to both.
    """
    image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_unit_array(image: Image.Image, size: int) -> np.ndarray:
    """RGB, resized to (size, size), as float32 in [0, 1] with shape (S, S, 3)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def channel_stats(images: Iterable[Image.Image], size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over a set of pictures (the training split), for ``ImagePreprocessing``."""
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    count = 0
    for image in images:
        pixels = to_unit_array(image, size).reshape(-1, 3).astype(np.float64)
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += pixels.shape[0]
    assert count > 0, "channel_stats needs at least one image"
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
