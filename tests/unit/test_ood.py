"""models/ood.py: the out-of-distribution density and the "uncertain" decision, on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.ood import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, OodDetector, fit_density, fit_detector, uncertain_reasons


def clusters(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray, spread: float = 0.3) -> np.ndarray:
    """n points around the given centres (one centre drawn per point), Gaussian noise of ``spread``."""
    picks = rng.integers(len(centres), size=n)
    return centres[picks] + spread * rng.standard_normal((n, dim))


@pytest.fixture
def features():
    """Text (8-d) and glimpse (4-d) features of 600 'validation' inputs in four clusters each, the text and image
    clusters paired (as a caption's kind goes with its picture)."""
    rng = np.random.default_rng(1)
    text_centres = 3.0 * rng.standard_normal((4, 8))
    image_centres = 3.0 * rng.standard_normal((4, 4))
    picks = rng.integers(4, size=600)
    text = text_centres[picks] + 0.3 * rng.standard_normal((600, 8))
    image = image_centres[picks] + 0.3 * rng.standard_normal((600, 4))
    return text, image, text_centres, image_centres


def test_inputs_like_validation_get_roughly_uniform_pvalues_and_far_ones_tiny_pvalues(features):
    text, image, text_centres, image_centres = features
    detector = fit_detector(text, image)
    rng = np.random.default_rng(2)
    picks = rng.integers(4, size=2000)
    fresh_text = text_centres[picks] + 0.3 * rng.standard_normal((2000, 8))
    fresh_image = image_centres[picks] + 0.3 * rng.standard_normal((2000, 4))
    both = np.ones(2000, bool)
    p = detector.pvalues(fresh_text, fresh_image, both, both)
    # Cross-fitted reference scores: about alpha of the inputs like the validation data fall below alpha.
    for alpha in (0.01, 0.05, 0.2):
        assert (p < alpha).mean() == pytest.approx(alpha, abs=max(0.6 * alpha, 0.01))
    # Far from every cluster: the smallest p-value there is (1 / (n + 1)).
    far = detector.pvalues(fresh_text + 20.0, fresh_image, both, both)
    assert far.max() == pytest.approx(1 / 601)


def test_a_pairing_never_seen_is_out_of_distribution_though_each_half_is_familiar(features):
    """Text of cluster 0 with the picture of cluster 1: each modality alone looks normal, the pair does not (a
    vague caption with a noise picture)."""
    text, image, text_centres, image_centres = features
    detector = fit_detector(text, image)
    rng = np.random.default_rng(3)
    mixed_text = text_centres[0] + 0.3 * rng.standard_normal((200, 8))
    mixed_image = image_centres[1] + 0.3 * rng.standard_normal((200, 4))
    yes, no = np.ones(200, bool), np.zeros(200, bool)
    assert (detector.pvalues(mixed_text, mixed_image, yes, yes) < 0.01).mean() > 0.95
    # A request with one modality is judged on it alone: each half on its own is typical.
    assert (detector.pvalues(mixed_text, mixed_image, yes, no) < 0.01).mean() < 0.05
    assert (detector.pvalues(mixed_text, mixed_image, no, yes) < 0.01).mean() < 0.05


def test_scores_are_squared_mahalanobis_distances_to_the_nearest_centre():
    """One tight cluster along a diagonal: the score follows the covariance's shape, not Euclidean distance."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal(500)
    points = np.stack([base + 0.05 * rng.standard_normal(500), base + 0.05 * rng.standard_normal(500)], 1)
    density = fit_density(points)
    along = density.scores(np.array([[1.5, 1.5]]))  # far along the cloud's long axis: typical
    across = density.scores(np.array([[0.4, -0.4]]))  # closer in Euclidean terms, but across it: atypical
    assert across[0] > 10 * along[0]


def test_saved_and_loaded_detector_scores_the_same(tmp_path, features):
    text, image, *_ = features
    detector = fit_detector(text, image)
    detector.save(tmp_path / "ood.npz")
    loaded = OodDetector.load(tmp_path / "ood.npz")
    has_text = np.arange(600) % 3 != 0
    has_image = np.arange(600) % 3 != 1
    np.testing.assert_array_equal(
        loaded.pvalues(text, image, has_text, has_image), detector.pvalues(text, image, has_text, has_image)
    )


def test_an_empty_file_is_refused(tmp_path):
    np.savez(tmp_path / "ood.npz", unrelated=np.zeros(3))
    with pytest.raises(ValueError, match="no density"):
        OodDetector.load(tmp_path / "ood.npz")


def test_uncertain_reasons_out_of_distribution_first_then_low_confidence():
    reasons = uncertain_reasons(
        confidence=[0.9, 0.3, 0.3, 0.9, 0.5], pvalue=[0.5, 0.5, 0.001, 0.001, 0.5], confidence_floor=0.5, ood_alpha=0.01
    )
    assert reasons == [None, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, OUT_OF_DISTRIBUTION, None]
    # Both thresholds at 0: never uncertain.
    assert uncertain_reasons([0.0], [0.0], 0.0, 0.0) == [None]


def test_the_image_encoder_map_is_a_second_view_and_the_smaller_p_value_counts_twice():
    """A request whose path ran the image encoder is also judged on the map's statistics (mean, spread, peak per
    channel); its p-value is the smaller of the two, doubled."""
    rng = np.random.default_rng(5)
    text, image = rng.standard_normal((400, 6)), rng.standard_normal((400, 3))
    peaks = rng.uniform(2.0, 3.0, (400, 4, 1, 1))  # every validation map has a bright spot: an object
    maps = 0.1 * rng.standard_normal((400, 4, 5, 5))
    maps[:, :, 2, 2] += peaks[:, :, 0, 0]
    detector = fit_detector(text, image, maps)
    assert set(detector.views) == {"both", "text", "image", "image_map"}
    flat = 0.1 * rng.standard_normal((50, 4, 5, 5))  # no bright spot: nothing there
    yes = np.ones(50, bool)
    rows = np.arange(0, 50, 2)  # half the requests ran the encoder
    p = detector.pvalues(text[:50], image[:50], yes, yes, flat[rows], rows)
    alone = detector.pvalues(text[:50], image[:50], yes, yes)
    np.testing.assert_allclose(p[rows], 2 / 401)  # the smallest p-value there is, doubled
    np.testing.assert_array_equal(p[1::2], alone[1::2])  # the others are judged on the encoders' view alone
