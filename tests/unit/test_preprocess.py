"""Serving preprocessing must give the training tensors bit for bit, or the store's figures drift."""

from __future__ import annotations

import numpy as np
from PIL import Image

from models.preprocess import ImagePreprocessing, to_pixels


def test_batch_normalization_equals_the_training_arithmetic_exactly():
    preprocessing = ImagePreprocessing(32, (0.52, 0.47, 0.41), (0.21, 0.19, 0.24))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)

    training = (pixels.astype(np.float32) / 255.0 - np.float32(preprocessing.mean)) / np.float32(preprocessing.std)
    served = preprocessing.normalize(pixels)

    assert served.shape == (5, 3, 32, 32)
    assert served.dtype == np.float32
    assert np.array_equal(served, training.transpose(0, 3, 1, 2))


def test_one_picture_resized_and_normalized_like_training():
    preprocessing = ImagePreprocessing(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8))

    expected = ((to_pixels(picture, 16).astype(np.float32) / 255.0 - 0.5) / np.float32(0.25)).transpose(2, 0, 1)
    assert np.array_equal(preprocessing(picture), expected)
    assert preprocessing.pixels(picture).shape == (16, 16, 3)
