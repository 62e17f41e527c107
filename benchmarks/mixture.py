"""A sampling problem with an exact answer: the ideal denoiser of a Gaussian mixture (EDM paper, Eqs. 2-3).

Data y ~ sum_k w_k N(mu_k, s_k^2 I) in ``dim`` dimensions. Noised by sigma, x = y + sigma n is a mixture of
N(mu_k, (s_k^2 + sigma^2) I), and the minimizer of Eq. 2 is, in closed form,

    D(x; sigma) = E[y | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k(x) = softmax_k(log w_k - |x - mu_k|^2 / (2 (s_k^2 + sigma^2)) - dim/2 log(s_k^2 + sigma^2)).

The probability-flow ODE (Eq. 4 with sigma(t) = t, s(t) = 1) of this denoiser maps each latent to one end point
x(0); ``exact_end_points`` computes it by classic RK4 in lambda = -log(sigma) (dx/dlambda = D - x), independent of
the solvers under test. ``relative_error`` is the RMS end-point distance over the data scale (the RMS per-coordinate
standard deviation of the data).
"""

from __future__ import annotations

import math

import torch


class GaussianMixtureDenoiser:
    """D(x; sigma) of a random mixture (seeded): ``num_components`` means drawn N(0, mean_scale^2 I), standard
    deviations log-uniform in ``std_range``, weights from a Dirichlet(1). Called like a network,
    ``D(x, sigma, class_labels=None)`` with x [N, C, H, W] (C H W = dim) and sigma a scalar or [N]; float64."""

    label_dim = 0
    sigma_min, sigma_max = 0, float("inf")

    def __init__(self, dim: int = 64, num_components: int = 16, mean_scale: float = 0.5,
                 std_range: tuple[float, float] = (0.05, 0.3), seed: int = 0,
                 shape: tuple[int, int, int] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.shape = shape or (1, int(math.isqrt(dim)), dim // int(math.isqrt(dim)))
        if math.prod(self.shape) != dim:
            raise ValueError(f"shape {self.shape} does not hold {dim} values")
        self.img_channels, self.img_resolution = self.shape[0], self.shape[1]
        self.dim = dim
        self.means = torch.randn([num_components, dim], generator=g, dtype=torch.float64) * mean_scale
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        self.stds = torch.exp(lo + (hi - lo) * torch.rand([num_components], generator=g, dtype=torch.float64))
        weights = -torch.rand([num_components], generator=g, dtype=torch.float64).log()
        self.log_weights = (weights / weights.sum()).log()
        self.calls = 0

    @property
    def data_scale(self) -> float:
        """sqrt(trace(Cov[y]) / dim): the RMS per-coordinate standard deviation of the data."""
        w = self.log_weights.exp()
        mean = w @ self.means
        second = (w * (self.stds ** 2 * self.dim + (self.means ** 2).sum(1))).sum()
        return math.sqrt(float(second - (mean ** 2).sum()) / self.dim)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        self.calls += 1
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).reshape(-1, 1)  # [1 or N, 1]
        variance = self.stds ** 2 + sigma ** 2                                                 # [1 or N, K]
        distance = torch.cdist(flat, self.means) ** 2                                          # [N, K]
        logits = self.log_weights - distance / (2 * variance) - self.dim / 2 * variance.log()
        r = torch.softmax(logits, dim=1)
        shrink = self.stds ** 2 / variance                                                     # [1 or N, K]
        # sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
        denoised = (r * (1 - shrink)) @ self.means + (r * shrink).sum(1, keepdim=True) * flat
        return denoised.reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of y, [n, C, H, W]."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn([n, self.dim], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * noise).reshape(n, *self.shape)


def exact_end_points(denoiser: GaussianMixtureDenoiser, latents: torch.Tensor, sigma_max: float = 80,
                     num_steps: int = 4096, sigma_end: float = 1e-6) -> torch.Tensor:
    """x(0) of the probability-flow ODE from x(sigma_max) = sigma_max latents: classic RK4 in lambda = -log(sigma)
    on dx/dlambda = D(x; sigma) - x with ``num_steps`` equal steps down to ``sigma_end``, then x(0) = D(x;
    sigma_end) (exact to O(sigma_end^2 / s_min^2) ~ 1e-9). Float64."""
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_end), num_steps + 1, dtype=torch.float64).tolist()
    x = latents.to(torch.float64) * sigma_max

    def slope(x_, lam):
        return denoiser(x_, math.exp(-lam)) - x_

    for lam, lam_next in zip(lambdas[:-1], lambdas[1:]):
        h = lam_next - lam
        k1 = slope(x, lam)
        k2 = slope(x + h / 2 * k1, lam + h / 2)
        k3 = slope(x + h / 2 * k2, lam + h / 2)
        k4 = slope(x + h * k3, lam_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return denoiser(x, sigma_end)


def relative_error(x: torch.Tensor, exact: torch.Tensor, data_scale: float) -> float:
    """RMS end-point distance per coordinate over the data scale."""
    return float((x.to(torch.float64) - exact).square().mean().sqrt()) / data_scale
