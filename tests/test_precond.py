"""Preconditioning: Table 1's coefficients, iDDPM's discrete levels, and Eq. 2-3 on Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.networks import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

SIGMAS = [0.002, 0.05, 0.3, 1.0, 4.0, 25.0, 80.0]
TINY = dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


def vp_sigma_inv_formula(sigma, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(sigma ** 2 + 1)) - beta_min) / beta_d


def table1(column: str, sigma: float, sigma_data: float = 0.5, M: int = 1000):
    """Table 1 of the paper, written out independently of the code under test (float64)."""
    if column == "VP":
        return 1, -sigma, 1 / math.sqrt(sigma ** 2 + 1), (M - 1) * vp_sigma_inv_formula(sigma)
    if column == "VE":
        return 1, sigma, 1, math.log(sigma / 2)
    if column == "EDM":
        return (sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2), sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2),
                1 / math.sqrt(sigma ** 2 + sigma_data ** 2), math.log(sigma) / 4)
    raise ValueError(column)


@pytest.mark.parametrize("column, cls", [("VP", VPPrecond), ("VE", VEPrecond), ("EDM", EDMPrecond)])
def test_coefficients_follow_table1(column, cls):
    net = cls(model_type="SongUNet", **TINY)
    for sigma in SIGMAS:
        got = net.coefficients(torch.tensor(sigma, dtype=torch.float64))
        want = table1(column, sigma)
        for name, g, w in zip(("c_skip", "c_out", "c_in", "c_noise"), got, want):
            assert float(g) == pytest.approx(w, rel=1e-9, abs=1e-12), f"{column} {name} at sigma={sigma}"


def test_iddpm_levels_and_coefficients():
    net = iDDPMPrecond(model_type="DhariwalUNet", **TINY)
    u = net.u.double()
    M = net.M
    assert u[M] == 0 and bool((u[:-1] > u[1:]).all())  # Strictly decreasing to u_M = 0.
    # The recurrence of Table 1, checked on a few entries in float64.
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (net.C_2 + 1)) ** 2
    for j in (1, 10, 500, 999, 1000):
        ratio = max(alpha_bar(j - 1) / alpha_bar(j), net.C_1)
        # Computed in float32 as the official (near u_M the ratio is close to 1 and cancels).
        assert float(u[j - 1]) == pytest.approx(math.sqrt((float(u[j]) ** 2 + 1) / ratio - 1), rel=1e-3)
    assert net.sigma_min == pytest.approx(float(u[M - 1])) and net.sigma_max == pytest.approx(float(u[0]))

    sigma = torch.tensor([0.01, 0.5, 3.0, 150.0])
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    nearest = (sigma.reshape(-1, 1) - net.u.reshape(1, -1)).abs().argmin(dim=1)
    assert torch.equal(index, nearest)
    assert torch.equal(rounded, net.u[nearest])
    assert torch.equal(net.round_sigma(rounded), rounded)  # Snapping is idempotent.
    c_skip, c_out, c_in, c_noise = net.coefficients(rounded.reshape(-1, 1, 1, 1))
    assert torch.equal(c_noise.flatten(), (M - 1 - nearest).float())
    torch.testing.assert_close(c_out.flatten(), -rounded)
    torch.testing.assert_close(c_in.flatten(), 1 / (rounded ** 2 + 1).sqrt())


def test_vp_sigma_range():
    net = VPPrecond(model_type="SongUNet", **TINY)
    sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    # Like the official, sigma(epsilon_t) is evaluated in float32, where exp(x) - 1 cancels: 2^-10, not 1.0005e-3.
    assert net.sigma_min == float(torch.tensor(sigma(1e-5) ** 2 + 1, dtype=torch.float32).sub(1).sqrt())
    assert net.sigma_min == pytest.approx(sigma(1e-5), rel=0.05)
    assert net.sigma_max == pytest.approx(sigma(1.0), rel=1e-6)
    t = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)


class IdealF(torch.nn.Module):
    """The raw network that makes D the exact denoiser of N(0, s^2 I) data: F = (D* - c_skip x) / c_out.

    It only sees what a real F sees, c_in x and c_noise, and recovers sigma from c_noise via ``sigma_of``.
    """

    def __init__(self, precond, sigma_of, data_std: float):
        super().__init__()
        self.coefficients = precond.coefficients
        self.sigma_of = sigma_of
        self.data_std = data_std

    def forward(self, x_in, c_noise, class_labels=None, **kwargs):
        sigma = self.sigma_of(c_noise.double()).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.coefficients(sigma)
        x = x_in.double() / c_in
        ideal = x * self.data_std ** 2 / (self.data_std ** 2 + sigma ** 2)
        return ((ideal - c_skip * x) / c_out).float()


@pytest.mark.parametrize("column", ["VP", "VE", "EDM", "iDDPM"])
def test_wrapping_the_ideal_F_gives_the_ideal_denoiser(column):
    """Eq. 2-3: for data N(0, s^2 I), D(x; sigma) = x s^2 / (s^2 + sigma^2); Eq. 7 must reproduce it."""
    s = 0.7
    if column == "VP":
        net = VPPrecond(model_type="SongUNet", **TINY)
        sigma_of = lambda c: net.sigma(c / (net.M - 1))
    elif column == "VE":
        net = VEPrecond(model_type="SongUNet", **TINY)
        sigma_of = lambda c: 2 * c.exp()
    elif column == "EDM":
        net = EDMPrecond(model_type="SongUNet", **TINY)
        sigma_of = lambda c: (4 * c).exp()
    else:
        net = iDDPMPrecond(model_type="DhariwalUNet", **TINY)
        sigma_of = lambda c: net.u.double()[(net.M - 1 - c).round().long()]
    net.model = IdealF(net, sigma_of, s)
    sigma = net.round_sigma(torch.tensor([0.05, 0.5, 2.0, 10.0]))
    x = torch.randn(4, 1, 8, 8)
    D = net(x, sigma)
    expected = x * s ** 2 / (s ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    torch.testing.assert_close(D, expected, rtol=1e-4, atol=1e-5)

    # The ideal denoiser is the minimizer of Eq. 2: Monte Carlo loss at D beats a perturbed D.
    torch.manual_seed(0)
    y = torch.randn(2000, 1, 8, 8) * s
    noisy = y + torch.randn_like(y) * 2.0
    best = ((net(noisy, 2.0) - y) ** 2).mean()
    worse = ((net(noisy, 2.0) * 1.1 - y) ** 2).mean()
    assert best < worse
