"""metrics/frechet.py and metrics/evaluate.py: FID and KID math against closed forms and direct formulas."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fid_of_features
from metrics.evaluate import compute_metrics, parse_metrics, reference_from_features
from metrics.frechet import feature_statistics, frechet_distance, kernel_inception_distance


def _random_spd(rng, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal([rank or 2 * dim, dim])
    return a.T @ a / a.shape[0]


def _fid_by_eigenvalues(mu1, s1, mu2, s2) -> float:
    """Tr (S1 S2)^(1/2) as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).standard_normal([50, 7]).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_fid_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    d1, d2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0, abs=1e-10)


def test_fid_matches_the_eigenvalue_formula_and_is_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    s1, s2 = _random_spd(rng, 40), _random_spd(rng, 40)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert fid == pytest.approx(_fid_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-9)
    assert fid == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_of_singular_covariances_is_finite_and_correct():
    """Fewer samples than dimensions: rank-deficient covariances, the case the eps fallback exists for."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal([5, 32]), rng.standard_normal([6, 32]) + 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(_fid_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-4)
    zero = np.zeros([32, 32])
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6)


def test_fid_within_the_span_of_the_features_equals_fid_in_full_dimension():
    """The property the slow tests rely on (see conftest.fid_of_features): FID is rotation invariant and
    nothing outside the span of the samples contributes."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal([6, 200]), rng.standard_normal([7, 200]) * 1.5 + 0.2
    full = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_of_features(a, b) == pytest.approx(full, rel=1e-5)


def test_large_imaginary_parts_are_an_error():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


def test_mismatched_statistics_are_an_error():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as the double sums of its definition."""
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal([12, 6]), rng.standard_normal([12, 6]) + 0.3
    # With subsets as large as the sets, every subset is a permutation: the estimate is the full MMD^2.
    assert kernel_inception_distance(x, y, num_subsets=3) == pytest.approx(_kid_direct(x, y), rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal([400, 16]), rng.standard_normal([400, 16])
    same = kernel_inception_distance(x, y, num_subsets=20, max_subset_size=200)
    small = kernel_inception_distance(x, y + 0.3, num_subsets=20, max_subset_size=200)
    large = kernel_inception_distance(x, y + 1.0, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.1 * small < 0.1 * large


def test_compute_metrics_and_metric_names():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal([30, 2048]) * 0.1, rng.standard_normal([30, 2048]) * 0.1
    with pytest.raises(ValueError, match="KID needs the reference's features"):
        compute_metrics(x, reference_from_features(y), ["kid"])
    result = compute_metrics(x, reference_from_features(y, keep_features=True), ["kid"])
    assert result["kid"] == pytest.approx(kernel_inception_distance(x, y))
    assert parse_metrics("FID, kid,fid") == ["fid", "kid"]
    with pytest.raises(ValueError, match="unknown metric 'is'"):
        parse_metrics("fid,is")
