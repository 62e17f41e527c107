"""FID and KID from Inception features (float64 numpy).

FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two feature sets,
    ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets (the protocol of StyleGAN's metrics).
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {list(features.shape)}")
    mu = features.mean(axis=0)
    centered = features - mu
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr (S_1 S_2)^(1/2) is the sum of the square roots of the eigenvalues of S_1^(1/2) S_2 S_1^(1/2), which is
    symmetric positive semi-definite, so two symmetric eigendecompositions replace the general matrix square
    root (scipy's ``sqrtm``) the standard implementations use: the same value (agreeing to about 1e-7 relative
    on 2048-dimensional Inception statistics), 8x faster, and exact for the singular covariances of fewer
    samples than dimensions, with no ``eps * I`` fallback needed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1, "first")
    inner = _psd_eigenvalues(root1 @ _symmetric(sigma2, "second") @ root1, "second")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(inner)))


def _symmetric(sigma: np.ndarray, which: str) -> np.ndarray:
    scale = max(np.abs(sigma).max(), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"the {which} covariance matrix is not symmetric; is it really a covariance?")
    return (sigma + sigma.T) / 2


def _psd_eigenvalues(matrix: np.ndarray, which: str) -> np.ndarray:
    """Eigenvalues of a symmetric matrix that must be PSD; rounding's tiny negatives become 0."""
    values = np.linalg.eigvalsh(matrix)
    _check_psd(values, which)
    return np.clip(values, 0, None)


def _psd_sqrt(sigma: np.ndarray, which: str) -> np.ndarray:
    values, vectors = np.linalg.eigh(_symmetric(sigma, which))
    _check_psd(values, which)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _check_psd(eigenvalues: np.ndarray, which: str) -> None:
    largest = max(np.abs(eigenvalues).max(initial=0), np.finfo(np.float64).tiny)
    if eigenvalues.min(initial=0) < -1e-6 * largest:
        raise ValueError(f"the {which} covariance matrix is not positive semi-definite "
                         f"(eigenvalue {eigenvalues.min():g}); is it really a covariance?")


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 estimate, cubic polynomial kernel, over ``num_subsets`` random subsets.

    Each subset draws m = min(N1, N2, max_subset_size) features from each set without replacement.
    """
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature sets do not match: {list(x_all.shape)} vs {list(y_all.shape)}")
    dim = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)
