"""FID and KID from Inception features (float64 numpy).

FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two feature sets,
    ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets (the protocol of StyleGAN's metrics).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {list(features.shape)}")
    mu = features.mean(axis=0)
    centered = features - mu
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), with scipy's ``sqrtm`` in float64.

    As the standard implementations do: when the product of the covariances is singular enough that its
    square root is not finite, both covariances get ``eps * I``; imaginary parts that rounding leaves in
    the square root are dropped when tiny (diagonal below 1e-3) and are an error otherwise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the square root of the covariance product has imaginary parts up to {largest:g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # Singular products are handled by the caller.
        result = scipy.linalg.sqrtm(matrix)
    # scipy < 1.12 returns (sqrtm, errest) when asked, and a bare array otherwise; keep only the array.
    return result[0] if isinstance(result, tuple) else result


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
