"""How unlike the validation data an input is, on features every request already has; and "uncertain".

NumPy only: the served pipeline scores every request with it, and evaluation calls the same code.

The features are what the pipeline computes anyway: the text encoder's pooled ``text_features`` and the
glimpse's ``glimpse_features`` for every request, and, for a request whose path ran the image encoder, the
statistics of its last feature map (``image_map``: each channel's mean, spread and peak). Each view (both
modalities, text alone, image alone, the image encoder's map) gets a density fitted on validation data: a
tied-covariance Gaussian mixture in standardized feature space, its centres found by k-means, its covariance
that of the residuals around them (shrunk towards a multiple of the identity by Ledoit and Wolf's estimate). An
input's score is its squared Mahalanobis distance to the nearest centre; its p-value is the share of held-out
validation inputs that score at least as high. The reference scores are cross-fitted (each half of validation
scored by a density fitted on the other half), so an in-distribution input's p-value is roughly uniform and a
cut at ``alpha`` flags about that share of them.

Why the image encoder's map: the glimpse (a 16x16 thumbnail) sees a picture of random noise much as it sees the
benchmark's corrupted and cluttered pictures, which come with vague captions too; the encoder's map at full
resolution shows that no object is there (its peaks are low). A request judged on two views has the smaller of
its two p-values, doubled (Bonferroni), so that about ``alpha`` of in-distribution inputs are still flagged.

Why a mixture and not one Gaussian per class: a class's inputs come in several kinds (a clear caption, a vague
one, a noisy picture), which one Gaussian per class would blur into one wide cloud. A mixture needs no labels, so
models trained on any data set get one.

Scoring costs D * D + k * D multiply-adds per input and view (D the view's width, k its centres): about 13 k for
the default model's two encoders' view (6% of its cheapest path), 43 k more for the map of a path that ran the
image encoder (0.5% of such a path).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEWS = ("both", "text", "image", "image_map")
MAP_TENSOR = "image_map"  # the image encoder's last feature map (B, C, h, w), when the answering path ran it
LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = "low_confidence", "out_of_distribution"
UNCERTAIN_REASONS = (LOW_CONFIDENCE, OUT_OF_DISTRIBUTION)
MIN_SHRINKAGE = 0.01  # of the covariance towards (trace / D) * I, whatever Ledoit and Wolf's estimate says
MAX_CENTRES = 32
SAMPLES_PER_CENTRE = 30  # fewer centres for a small validation split: each needs samples to place it
KMEANS_ITERATIONS = 50


@dataclass(frozen=True)
class Density:
    """One view's density: standardize, whiten, then the squared distance to the nearest (whitened) centre."""

    mean: np.ndarray  # (D,) of the validation features
    scale: np.ndarray  # (D,) their standard deviation (floored)
    whiten: np.ndarray  # (D, D): y = ((x - mean) / scale) @ whiten has identity covariance around the centres
    centres: np.ndarray  # (k, D) whitened
    reference: np.ndarray  # (n,) sorted cross-fitted scores of validation inputs

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distances of (N, D) features to the nearest centre."""
        whitened = ((features - self.mean) / self.scale) @ self.whiten  # (N, D)
        squared = (
            (whitened**2).sum(axis=1, keepdims=True)
            - 2.0 * whitened @ self.centres.T
            + (self.centres**2).sum(axis=1)[None, :]
        )  # (N, k)
        return np.maximum(squared.min(axis=1), 0.0)

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """(N,) the share of reference scores at least as high, with the +1 of a conformal p-value."""
        n = len(self.reference)
        at_least = n - np.searchsorted(self.reference, scores, side="left")
        return (1.0 + at_least) / (1.0 + n)


@dataclass(frozen=True)
class OodDetector:
    views: dict[str, Density]  # "both", "text", "image"

    def pvalues(
        self,
        text_features: np.ndarray,  # (N, Dt); rows without text are ignored
        glimpse_features: np.ndarray,  # (N, Dg); rows without an image are ignored
        has_text: np.ndarray,  # (N,) bool
        has_image: np.ndarray,  # (N,) bool
        image_map: np.ndarray | None = None,  # (M, C, h, w) of the rows ``map_rows``, those that ran the encoder
        map_rows: np.ndarray | None = None,  # (M,) int
    ) -> np.ndarray:
        """(N,) each input's p-value under the views of what it carries (small: unlike validation)."""
        out = np.ones(len(has_text), np.float64)
        for view, rows in (
            ("both", has_text & has_image),
            ("text", has_text & ~has_image),
            ("image", ~has_text & has_image),
        ):
            if rows.any() and view in self.views:
                density = self.views[view]
                out[rows] = density.pvalues(density.scores(_view(view, text_features[rows], glimpse_features[rows])))
        if MAP_TENSOR in self.views and image_map is not None and map_rows is not None and len(map_rows):
            density = self.views[MAP_TENSOR]
            on_map = density.pvalues(density.scores(map_statistics(image_map)))
            out[map_rows] = np.minimum(1.0, 2.0 * np.minimum(out[map_rows], on_map))
        return out

    # -- files --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {f"{view}.{name}": getattr(d, name) for view, d in self.views.items() for name in _FIELDS}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> OodDetector:
        with np.load(Path(path), allow_pickle=False) as arrays:
            views = {
                view: Density(**{name: np.asarray(arrays[f"{view}.{name}"], np.float64) for name in _FIELDS})
                for view in VIEWS
                if f"{view}.mean" in arrays
            }
        if not views:
            raise ValueError(f"{path}: no density of any view ({', '.join(VIEWS)})")
        return cls(views)


_FIELDS = ("mean", "scale", "whiten", "centres", "reference")


def map_statistics(image_map: np.ndarray) -> np.ndarray:
    """(B, 3C) each channel's mean, spread and peak over the map's positions, of a (B, C, h, w) feature map."""
    flat = np.asarray(image_map, np.float64).reshape(image_map.shape[0], image_map.shape[1], -1)
    return np.concatenate([flat.mean(axis=2), flat.std(axis=2), flat.max(axis=2)], axis=1)


def _view(view: str, text_features: np.ndarray, glimpse_features: np.ndarray) -> np.ndarray:
    if view == "both":
        return np.concatenate([text_features, glimpse_features], axis=1)
    return text_features if view == "text" else glimpse_features


# -- fitting (export time) ----------------------------------------------------------------------
def fit_detector(
    text_features: np.ndarray, glimpse_features: np.ndarray, image_map: np.ndarray | None = None, seed: int = 0
) -> OodDetector:
    """A detector fitted on validation features (both modalities present on every row); ``image_map``: the image
    encoder's maps of the same rows, for a model that has one."""
    text_features = np.asarray(text_features, np.float64)
    glimpse_features = np.asarray(glimpse_features, np.float64)
    views = {view: fit_density(_view(view, text_features, glimpse_features), seed=seed) for view in VIEWS[:3]}
    if image_map is not None:
        views[MAP_TENSOR] = fit_density(map_statistics(image_map), seed=seed)
    return OodDetector(views)


def fit_density(features: np.ndarray, seed: int = 0, folds: int = 2) -> Density:
    """One view's density, with reference scores cross-fitted over ``folds`` parts of ``features``."""
    features = np.asarray(features, np.float64)
    n = len(features)
    assert n >= 2 * folds, f"{n} validation inputs are too few to fit an out-of-distribution density"
    order = np.random.default_rng(seed).permutation(n)
    reference = np.empty(n)
    for fold in range(folds):
        held_out = order[fold::folds]
        rest = np.setdiff1d(order, held_out)
        reference[held_out] = _fit(features[rest], seed, reference=np.zeros(1)).scores(features[held_out])
    return _fit(features, seed, reference=np.sort(reference))


def _fit(features: np.ndarray, seed: int, reference: np.ndarray) -> Density:
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), 1e-6)
    standardized = (features - mean) / scale  # (n, D)
    k = int(np.clip(len(features) // SAMPLES_PER_CENTRE, 1, MAX_CENTRES))
    centres, assignment = _kmeans(standardized, k, seed)
    covariance = shrunk_covariance(standardized - centres[assignment])  # (D, D)
    # whiten @ whiten.T = covariance^-1, from the eigendecomposition (symmetric, positive definite after shrinkage)
    values, vectors = np.linalg.eigh(covariance)
    whiten = vectors / np.sqrt(np.maximum(values, 1e-12))[None, :]
    return Density(mean, scale, whiten, centres @ whiten, reference)


def shrunk_covariance(residuals: np.ndarray) -> np.ndarray:
    """The covariance of (n, D) zero-mean residuals shrunk towards (trace / D) * I by Ledoit and Wolf's estimate
    of the best intensity (2004): little shrinkage with many samples per dimension, much with few, so that a small
    validation split still gives a well-conditioned matrix whose held-out distances mean something."""
    n, dim = residuals.shape
    sample = residuals.T @ residuals / n
    scale = np.trace(sample) / dim
    target_distance = ((sample - scale * np.eye(dim)) ** 2).sum() / dim
    # Sum over samples of ||x x' - S||^2 = sum ||x||^4 - n ||S||^2
    spread = (((residuals**2).sum(axis=1) ** 2).sum() - n * (sample**2).sum()) / (n * n * dim)
    intensity = 1.0 if target_distance <= 0 else float(np.clip(spread / target_distance, MIN_SHRINKAGE, 1.0))
    return (1.0 - intensity) * sample + intensity * scale * np.eye(dim)


def _kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from a k-means++ start; deterministic for a seed. Returns (centres (k, D), assignment (n,))."""
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = ((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(axis=1)
        total = distance.sum()
        pick = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(len(points))
        centres.append(points[pick])
    centres = np.asarray(centres)
    assignment = np.zeros(len(points), int)
    for _ in range(KMEANS_ITERATIONS):
        distance = ((points[:, None, :] - centres[None]) ** 2).sum(-1)  # (n, k)
        new_assignment = distance.argmin(axis=1)
        for c in range(k):
            members = points[new_assignment == c]
            if len(members):
                centres[c] = members.mean(axis=0)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return centres, assignment


# -- the flag -----------------------------------------------------------------------------------
def uncertain_reasons(
    confidence: np.ndarray,  # (N,) the answering path's calibrated top probability
    pvalue: np.ndarray,  # (N,) out-of-distribution p-value of the input (1 when there is no detector)
    confidence_floor: float,
    ood_alpha: float,
) -> list[str | None]:
    """Why each answer is uncertain, or None: an input unlike validation data first (it explains a low
    confidence, and a confident answer to such an input is the one a user most needs to doubt), then a
    calibrated confidence below the floor."""
    reasons: list[str | None] = []
    for c, p in zip(np.asarray(confidence, np.float64), np.asarray(pvalue, np.float64), strict=True):
        reasons.append(OUT_OF_DISTRIBUTION if p < ood_alpha else LOW_CONFIDENCE if c < confidence_floor else None)
    return reasons
