"""Image preprocessing shared by training and serving (Pillow + NumPy, no torch).

Training and the served pipeline call the same function, so an image gives the same tensor in both,
which is what lets the exported model reproduce the evaluation figures.
"""

from __future__ import annotations

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
        return self.normalize(self.pixels(image)[None])[0]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The picture resized, as uint8 (S, S, 3): the per-request half, cheap and small to carry."""
        return to_pixels(image, self.image_size)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S, S), in one vectorized pass over a batch.

        Training and serving both normalize here, so a picture gives the same bits to both: x / 255 in
        float32, minus the mean, over the std."""
        # A channel has 256 possible values: look them up in a table computed with the training
        # arithmetic. One gather instead of four full-size passes (broadcasting over a last axis of 3
        # cost ~2 ms per batch of 16 on the served path).
        table = self._table()  # (3, 256)
        out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), np.float32)  # (N, 3, S, S)
        for channel in range(3):
            # A uint8 index is always in range, so "clip" never clips; with the default "raise", NumPy
            # writes into a buffer first and copies it into ``out``.
            np.take(table[channel], pixels[..., channel], out=out[:, channel], mode="clip")
        return out

    def thumbnail(self, pixels: np.ndarray, side: int) -> np.ndarray:
        """uint8 (N, S, S, 3) -> the glimpse's float32 (N, 3, side, side): blocks averaged, then normalized.

        Normalizing is affine per channel, so it commutes with averaging: this equals training's average
        pooling of the normalized image (models/encoders.py thumbnail), up to float rounding."""
        n, size = pixels.shape[0], pixels.shape[1]
        factor = size // side
        # Block sums as a few whole-array additions of uint16 slices: NumPy's mean over two strided axes took
        # 3 ms for a batch of 16, more than every component the request then runs.
        rows = pixels.reshape(n, side, factor, size * 3).astype(np.uint16)  # (N, g, f, S*3)
        summed = rows[:, :, 0]
        for i in range(1, factor):
            summed = summed + rows[:, :, i]  # (N, g, S*3)
        columns = summed.reshape(n, side, side, factor, 3)
        total = columns[:, :, :, 0]
        for j in range(1, factor):
            total = total + columns[:, :, :, j]  # (N, g, g, 3), at most 255 * f * f
        unit = total.astype(np.float32) / np.float32(255.0 * factor * factor)
        normalized = (unit - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))

    def _table(self) -> np.ndarray:
        table = self.__dict__.get("_lookup")
        if table is None:
            unit = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
            table = (unit - np.asarray(self.mean, np.float32)[:, None]) / np.asarray(self.std, np.float32)[:, None]
            object.__setattr__(self, "_lookup", table)  # frozen dataclass: a cache, not state
        return table

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> ImagePreprocessing:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))


def to_rgb(image: Image.Image, *, in_place: bool = False) -> Image.Image:
    """Upright RGB: the camera's EXIF orientation applied, alpha and palettes dropped.

    Training data and served requests both pass through here, so a picture means the same to both. With
    ``in_place`` an RGB picture is turned where it is and returned, not copied first (Pillow copies even a picture
    with nothing to turn): for a caller that does not need the picture as it was. The pixels are the same.
    """
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB, resized to (size, size) (bilinear), as uint8 with shape (S, S, 3)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
