"""An analytic first step: the probability-flow ODE of Gaussian data, solved in closed form.

``GaussianData`` transports x from sigma_max to a lower level without any network call, for any solver, with the
Gaussian fitted to the network's own outputs (``fit_gaussian``); the registry's 'NAME+gaussian' time steps use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class GaussianData:
    """Data N(mean, eigvecs diag(eigvals) eigvecs^T) over flattened samples of ``dim`` values (float64).

    Its ideal denoiser is linear, D(x; sigma) = mean + Sigma (Sigma + sigma^2 I)^-1 (x - mean), and its
    probability-flow ODE, dx/dsigma = sigma (Sigma + sigma^2 I)^-1 (x - mean) (Eq. 4 with sigma(t) = t, s(t) = 1),
    is solved in closed form along each eigenvector: x(sigma) - mean scales by sqrt((lambda_k + sigma^2) /
    (lambda_k + sigma_0^2)). At large sigma every data distribution's D is this one's to first order in 1 / sigma^2
    (the noised density tends to the Gaussian with the data's mean and covariance), which makes ``transport`` an
    analytic first step from sigma_max down to a level where the network's D starts to bend: the "analytical
    teleportation" of Wang & Vastola 2023 ("The hidden linear structure in score-based models"); the analytic
    first step of Zhou et al. 2024 (AMED, "AFS") is its special case mean = 0, Sigma = 0.
    """
    mean: torch.Tensor      # [dim]
    eigvals: torch.Tensor   # [dim], >= 0
    eigvecs: torch.Tensor   # [dim, dim], orthonormal columns

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The ideal denoiser of this Gaussian at ``sigma``, x: [N, ...]."""
        shrink = self.eigvals / (self.eigvals + sigma ** 2)
        return self._along_eigvecs(x, shrink)

    def transport(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """x(sigma_to) on the ODE trajectory through x = x(sigma_from), in closed form; no network call."""
        scale = torch.sqrt((self.eigvals + sigma_to ** 2) / (self.eigvals + sigma_from ** 2))
        return self._along_eigvecs(x, scale)

    def _along_eigvecs(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(torch.float64) - self.mean
        return (self.mean + ((flat @ self.eigvecs) * scale) @ self.eigvecs.T).reshape(x.shape)


def fit_gaussian(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> GaussianData:
    """The Gaussian whose ideal denoiser at ``sigma`` is the affine least-squares fit D(x) ~ b + A x of the pairs
    (x_i, D(x_i; sigma)) (x, denoised: [n, ...], n > dim; probes at a level where D is close to affine).

    For Gaussian data A = Sigma (Sigma + sigma^2 I)^-1 and b = (I - A) mean, hence Sigma = sigma^2 A (I - A)^-1
    and mean = (I - A)^-1 b, both in the eigenbasis of the symmetric part of A (eigenvalues clipped to [0, 1)).
    """
    n, dim = len(x), x[0].numel()
    if n <= dim:
        raise ValueError(f"fit_gaussian: {n} probes cannot determine an affine map of {dim} values (need > {dim})")
    inputs = x.reshape(n, -1).to(torch.float64)
    design = torch.cat([torch.ones([n, 1], dtype=torch.float64, device=inputs.device), inputs], dim=1)
    coefficients = torch.linalg.lstsq(design, denoised.reshape(n, -1).to(torch.float64)).solution  # [1 + dim, dim]
    offset, A = coefficients[0], coefficients[1:].T
    a, eigvecs = torch.linalg.eigh((A + A.T) / 2)
    a = a.clip(0, 1 - 1e-12)
    mean = eigvecs @ ((eigvecs.T @ offset) / (1 - a))
    return GaussianData(mean, sigma ** 2 * a / (1 - a), eigvecs)
