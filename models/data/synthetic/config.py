"""What the synthetic benchmark is made of: classes, kinds, splits, and the config that fixes one data set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GENERATOR_VERSION = 2  # bump when images or captions change, so data sets made by different versions can be told apart

# The five kinds of sample. Each is there so that one expert path, and one modality's router, has cases where it
# is the one that matters (models/data/synthetic/__init__.py describes them).
KINDS = ("text_sufficient", "image_needed", "noisy_image", "image_decides", "cross_modal")
# The default mix: common easy cases (the caption names the class) and enough of every harder kind that each
# expert of the cost ladder has work. Every figure in the README and bench/BENCHMARKS.md is reported at it.
DEFAULT_MIX = (0.30, 0.15, 0.10, 0.25, 0.20)
SPLITS = ("train", "val", "test")
OOD_SPLIT = "test_ood"  # captions from a held-out family; written beside the three splits, never trained on
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle", "cross")
LABELS = tuple(sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES))


@dataclass(frozen=True)
class SynthConfig:
    size: int = 8000  # samples over train, val and test
    seed: int = 0  # non-negative; everything generated derives from it
    image_size: int = 64  # images are image_size x image_size RGB
    mix: tuple[float, ...] = DEFAULT_MIX  # fractions of each kind, in KINDS order
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)  # fractions of train, val, test
    ood_size: int | None = None  # samples in test_ood (same mix, held-out captions); None: as many as test, 0: none

    def __post_init__(self) -> None:
        # Stored as float tuples so that a config built from lists or ints compares, hashes and serializes the same.
        object.__setattr__(self, "mix", fractions("mix", self.mix, KINDS))
        object.__setattr__(self, "splits", fractions("splits", self.splits, SPLITS))
        minimum = len(LABELS) * len(SPLITS)
        if not _is_int(self.size) or self.size < minimum:
            raise ValueError(f"size must be an integer >= {minimum} (12 classes x 3 splits), got {self.size!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.image_size) or self.image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16 (shapes blur away below), got {self.image_size!r}")
        if self.ood_size is not None and (not _is_int(self.ood_size) or self.ood_size < 0):
            raise ValueError(f"ood_size must be a non-negative integer or None, got {self.ood_size!r}")
        for split, count in zip(SPLITS, apportion(self.size, self.splits), strict=True):
            if count == 0:
                raise ValueError(
                    f"splits {self.splits} leave the {split} split empty at size {self.size}; "
                    "give every split a larger fraction or raise size"
                )

    @property
    def split_sizes(self) -> dict[str, int]:
        """Samples per split, test_ood included when it has any."""
        sizes = dict(zip(SPLITS, apportion(self.size, self.splits), strict=True))
        ood = sizes["test"] if self.ood_size is None else self.ood_size
        return sizes | ({OOD_SPLIT: ood} if ood else {})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fractions(name: str, values: Sequence[float], names: Sequence[str]) -> tuple[float, ...]:
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {len(names)} numbers ({', '.join(names)}), got {values!r}") from None
    if len(result) != len(names):
        raise ValueError(f"{name} needs {len(names)} fractions ({', '.join(names)}), got {len(result)}: {values!r}")
    if any(not math.isfinite(f) or f < 0 for f in result):
        raise ValueError(f"{name} fractions must be finite and non-negative, got {values!r}")
    if abs(sum(result) - 1.0) > 1e-6:
        raise ValueError(
            f"{name} fractions ({', '.join(names)}) must sum to 1, got {values!r} (sum {sum(result):.6g}); "
            "scale them so they do"
        )
    return result


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, as close to ``total * share`` as possible (largest remainder)."""
    scale = sum(shares)
    exact = [total * f / scale for f in shares]
    counts = [math.floor(x) for x in exact]
    # Ties go to the earlier entry, so the result depends only on the inputs.
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
