"""metrics/frechet.py and metrics/evaluate.py: FID and KID math against closed forms and direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from conftest import fid_of_features
from metrics.evaluate import compute_metrics, parse_metrics, reference_from_features
from metrics.frechet import feature_statistics, frechet_distance, kernel_inception_distance


def _random_spd(rng, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal([rank or 2 * dim, dim])
    return a.T @ a / a.shape[0]


def _fid_by_sqrtm(mu1, s1, mu2, s2, eps: float = 1e-6) -> float:
    """The standard implementations' formula: scipy's general sqrtm of S1 S2, eps * I when it is not finite."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


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


def test_fid_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    s1, s2 = _random_spd(rng, 40), _random_spd(rng, 40)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert fid == pytest.approx(_fid_by_sqrtm(mu1, s1, mu2, s2), rel=1e-9)
    assert fid == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_of_singular_covariances_is_finite_and_correct():
    """Fewer samples than dimensions: rank-deficient covariances, the case the eps fallback exists for."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal([5, 32]), rng.standard_normal([6, 32]) + 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(_fid_by_sqrtm(mu1, s1, mu2, s2), rel=1e-4)
    zero = np.zeros([32, 32])
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6)


def test_fid_agrees_with_sqrtm_on_feature_like_statistics():
    """Fewer samples than dimensions and a heavy-tailed spectrum, as with 500 Inception features in 2048-D."""
    rng = np.random.default_rng(5)
    scales = np.geomspace(3, 1e-3, 384)
    a = rng.standard_normal([120, 384]) * scales
    b = rng.standard_normal([100, 384]) * scales * 1.3 + 0.01
    stats = *feature_statistics(a), *feature_statistics(b)
    assert frechet_distance(*stats) == pytest.approx(_fid_by_sqrtm(*stats), rel=1e-6)


def test_fid_within_the_span_of_the_features_equals_fid_in_full_dimension():
    """The property the slow tests rely on (see conftest.fid_of_features): FID is rotation invariant and
    nothing outside the span of the samples contributes."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal([6, 200]), rng.standard_normal([7, 200]) * 1.5 + 0.2
    full = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_of_features(a, b) == pytest.approx(full, rel=1e-5)


def test_a_matrix_that_is_not_a_covariance_is_an_error():
    with pytest.raises(ValueError, match="first covariance matrix is not positive semi-definite"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="second covariance matrix is not positive semi-definite"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.diag([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


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


def test_each_frechet_metric_compares_its_own_detectors_statistics():
    """FID compares the Inception's features with 'mu'/'sigma', FD-DINOv2 DINOv2's with 'fd_dinov2_mu'/'_sigma'
    (small dimensions here: compute_metrics does not mind the size)."""
    rng = np.random.default_rng(3)
    inception, dinov2 = rng.standard_normal([40, 6]), rng.standard_normal([40, 4]) + 1
    inception_ref, dinov2_ref = rng.standard_normal([30, 6]) * 2, rng.standard_normal([30, 4])
    ref = {**reference_from_features(inception_ref), **reference_from_features(dinov2_ref, detector="dinov2")}
    assert sorted(ref) == ["fd_dinov2_mu", "fd_dinov2_sigma", "mu", "sigma"]
    result = compute_metrics({"inception": inception, "dinov2": dinov2}, ref, ["fd_dinov2", "fid"])
    assert list(result) == ["fd_dinov2", "fid"]
    assert result["fid"] == pytest.approx(frechet_distance(*feature_statistics(inception),
                                                           *feature_statistics(inception_ref)))
    assert result["fd_dinov2"] == pytest.approx(frechet_distance(*feature_statistics(dinov2),
                                                                 *feature_statistics(dinov2_ref)))
    assert compute_metrics(inception, ref, ["fid"]) == {"fid": result["fid"]}  # The Inception's features alone.
    assert parse_metrics("fid,FD_DINOv2") == ["fid", "fd_dinov2"]

