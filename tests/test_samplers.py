"""The named samplers (training.sampling: SAMPLERS, solvers, time steps, search): convergence orders
on a Gaussian mixture with an exact answer, the NFE budget, the paper's samplers pinned bit for bit, the schedules'
formulas and the command-line options."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from benchmarks.mixture import GaussianMixtureDenoiser, exact_end_points, relative_error
from conftest import FIXTURES, make_tiny_net
from test_sampling import GaussianDenoiser as IsotropicGaussian
from training import sampling
from training.sampling import registry, solvers
from training.sampling.gaussian import fit_gaussian
from training.sampling import SAMPLERS, SeedRNG, ablation_sampler, draw_class_labels, draw_latents, edm_sampler
from training.sampling.time_steps import loguniform_sigma_steps, polyexponential_sigma_steps

pytestmark = pytest.mark.usefixtures("single_thread")

# The ODE and SDE solvers; the consistency sampler (a consistency model's, tests/test_consistency.py) is neither.
DETERMINISTIC = [name for name, sampler in SAMPLERS.items() if not sampler.solver.stochastic]
STOCHASTIC = [name for name, sampler in SAMPLERS.items() if sampler.solver.stochastic and sampler.solver.solves_ode]


class CountingNet:
    """A denoiser that counts its calls and remembers the inputs of each."""

    def __init__(self, net):
        self.net, self.calls, self.inputs = net, 0, []

    def __getattr__(self, name):
        return getattr(self.__dict__["net"], name)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.inputs.append(x)
        return self.net(x, sigma, class_labels)


def small_mixture() -> GaussianMixtureDenoiser:
    """Overlapping components in 4 dimensions: every end point is far from a basin boundary, so the error is in its
    asymptotic regime from a few dozen calls on."""
    return GaussianMixtureDenoiser(dim=4, num_components=3, mean_scale=0.5, std_range=(0.3, 0.6), shape=(1, 2, 2))


def _latents(net, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn([n, *net.shape], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def problem():
    """(denoiser, latents, exact end points from sigma 80, exact end points from sigma 2)."""
    net = small_mixture()
    z = _latents(net)
    return (net, z, exact_end_points(net, z, num_steps=768, sigma_end=1e-5),
            exact_end_points(net, z, sigma_max=2, num_steps=512, sigma_end=1e-5))

# ----------------------------------------------------------------------------
# The paper's samplers, bit for bit.


PINNED = {  # Outputs saved before the named samplers existed: tests/fixtures/sampler-pins.pt.
    "edm-default-6": ("edm", dict(num_steps=6)),
    "edm-churn": ("edm", dict(num_steps=5, S_churn=20, S_min=0.05, S_max=30, S_noise=1.007)),
    "edm-rho3": ("edm", dict(num_steps=4, rho=3, sigma_min=0.01, sigma_max=50)),
    "ablation-vp": ("ablation", dict(num_steps=5, solver="euler", discretization="vp", schedule="vp", scaling="vp")),
    "ablation-ve": ("ablation", dict(num_steps=5, solver="euler", discretization="ve", schedule="ve", scaling="none")),
    "ablation-iddpm": ("ablation", dict(num_steps=5, solver="euler", discretization="iddpm", schedule="linear",
                                        scaling="none")),
    "ablation-heun-vp-alpha": ("ablation", dict(num_steps=5, solver="heun", discretization="edm", schedule="vp",
                                                scaling="vp", alpha=0.75, S_churn=10)),
}


def _pinned_inputs():
    net = make_tiny_net(label_dim=4)
    rng = SeedRNG([0, 1, 7])
    return net, draw_latents(net, rng), draw_class_labels(net, rng), rng


@pytest.mark.parametrize("case", list(PINNED))
def test_paper_samplers_give_their_outputs_from_before(case):
    """Bit for bit on the CPU that saved the pins (AVX2); on one with AVX-512 the tiny network's float32
    convolutions round differently (oneDNN picks its kernels by the CPU, whatever ATEN_CPU_CAPABILITY says), which
    moved these images by up to 2e-6 of their range: the tolerance, 1e-5 of it, is far below what any change to a
    sampler's arithmetic does (S_noise 1.007 against 1 alone moves edm-churn by 4e-3)."""
    pins = torch.load(os.path.join(FIXTURES, "sampler-pins.pt"), weights_only=True)
    kind, kwargs = PINNED[case]
    net, latents, labels, rng = _pinned_inputs()
    with torch.no_grad():
        images = (edm_sampler if kind == "edm" else ablation_sampler)(net, latents, labels, randn_like=rng.randn_like,
                                                                      **kwargs)
    torch.testing.assert_close(images, pins[case], rtol=0, atol=1e-5 * pins[case].abs().max().item())


@pytest.mark.parametrize("churn", [dict(), dict(S_churn=20, S_min=0.05, S_max=30, S_noise=1.007)])
def test_registry_heun_and_euler_are_the_papers(churn):
    """'heun' with nfe = 2N - 1 is edm_sampler with N steps, 'euler' with nfe = N the ablation sampler's Euler on
    Eq. 5's steps: bit for bit, churn included."""
    net, latents, labels, _ = _pinned_inputs()
    with torch.no_grad():
        for name, nfe, reference in (("heun", 9, lambda rng: edm_sampler(net, latents, labels, rng.randn_like,
                                                                         num_steps=5, **churn)),
                                     ("euler", 5, lambda rng: ablation_sampler(net, latents, labels, rng.randn_like,
                                                                               num_steps=5, solver="euler", **churn))):
            ours = SAMPLERS[name](net, latents, labels, SeedRNG([0, 1, 7]).randn_like, nfe=nfe, **churn)
            assert torch.equal(ours, reference(SeedRNG([0, 1, 7]))), name


def test_every_registry_entrys_solver_runs_on_a_denoiser_and_levels():
    """``SAMPLERS[name].solver(denoise, x, sigmas)``, the API docs/samplers.md shows, works for every name. The
    paper's Heun is Algorithm 1 written out here (Heun steps, Euler to 0), to rounding; the ODE solvers approach the
    exact end point of a Gaussian's probability flow as their levels multiply."""
    data = IsotropicGaussian(mu=0.3, sigma_data=0.5)
    denoise = lambda x, sigma: data(x, sigma)  # noqa: E731
    sigmas = sampling.edm_sigma_steps(12, 0.002, 80, 7)
    x = torch.randn([4, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    exact = data.exact_flow(x, 80, 0)
    for name, sampler in SAMPLERS.items():
        noise = torch.Generator().manual_seed(1)
        out = sampler.solver(denoise, x, sigmas,
                             lambda t: torch.randn(t.shape, generator=noise, dtype=t.dtype))
        assert out.shape == x.shape and out.dtype == torch.float64 and bool(out.isfinite().all()), name
        if sampler.solver.solves_ode and not sampler.solver.stochastic:  # Four times the levels: closer.
            finer = sampling.edm_sigma_steps(48, 0.002, 80, 7)
            out_finer = sampler.solver(denoise, x / sigmas[0] * finer[0], finer)
            assert (out_finer - exact).abs().max() < 0.5 * (out - exact).abs().max(), name

    by_hand = x.clone()
    levels = [*sigmas.tolist(), 0.0]
    for i, (t, t_next) in enumerate(zip(levels[:-1], levels[1:])):
        d = (by_hand - denoise(by_hand, torch.tensor(t, dtype=torch.float64))) / t
        euler = by_hand + (t_next - t) * d
        if t_next > 0:
            d_next = (euler - denoise(euler, torch.tensor(t_next, dtype=torch.float64))) / t_next
            by_hand = by_hand + (t_next - t) * (d + d_next) / 2
        else:
            by_hand = euler
    torch.testing.assert_close(SAMPLERS["heun"].solver(denoise, x, sigmas), by_hand, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Convergence orders on the mixture.


def _order_setup(name: str, nfe: int):
    """(schedule, sigma_max) of the order measurement: log-uniform levels from 80 for the solvers in log(sigma), Eq. 5's
    for LMS; equal steps in sigma from 2 (the last one to 0) for Euler, Heun and iPNDM, whose fixed Adams weights
    assume equal steps."""
    solver = SAMPLERS[name].solver
    if name == "lms":
        return "edm", 80
    if name in ("euler", "heun", "ipndm"):
        levels = solver.levels_for(nfe)
        return torch.linspace(2, 2 / levels, levels, dtype=torch.float64), 2
    return "loguniform", 80


ORDER_NFES = {"euler": (16, 32, 64), "heun": (31, 63, 127), "dpmpp_2s": (31, 63, 127), "unipc_bh1": (32, 64, 128),
              "unipc_bh2": (32, 64, 128), "ipndm": (32, 64, 128), "lms": (64, 128, 256)}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_empirical_order_is_at_least_nominal(problem, name):
    """Slope of log error against log NFE over a doubling range in the asymptotic regime >= the solver's order
    (0.25 of slack: at finite NFE the slopes still approach the order from below or above)."""
    net, z, exact_80, exact_2 = problem
    nfes = ORDER_NFES.get(name, (16, 32, 64))
    errors = []
    for nfe in nfes:
        schedule, sigma_max = _order_setup(name, nfe)
        x = SAMPLERS[name](net, z, nfe=nfe, time_steps=schedule, sigma_max=sigma_max)
        errors.append(relative_error(x, exact_80 if sigma_max == 80 else exact_2, net.data_scale))
    slopes = -np.diff(np.log(errors)) / np.diff(np.log(nfes))
    assert min(slopes) >= SAMPLERS[name].solver.convergence_order - 0.25, f"{name}: errors {errors}, slopes {slopes}"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_at_eta_0_are_their_ode_solvers(problem, name):
    """With eta = 0 the SDE solvers draw no noise and converge with their order; with eta = 1 they keep the data's
    distribution (checked on a Gaussian, where the marginals are known)."""
    net, z, exact_80, _ = problem
    solver = SAMPLERS[name].solver
    errors = []
    for nfe in (16, 32, 64):
        sigmas = loguniform_sigma_steps(nfe, 0.002, 80)
        x = solver(lambda x_, s: net(x_, s), z * 80, sigmas, lambda x_: pytest.fail("noise drawn at eta 0"), eta=0)
        errors.append(relative_error(x, exact_80, net.data_scale))
    slopes = -np.diff(np.log(errors)) / np.log(2)
    assert min(slopes) >= solver.convergence_order - 0.15, f"{name}: errors {errors}, slopes {slopes}"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_keep_the_marginals(name):
    """On Gaussian data, where D is exact, the samples' mean and variance approach the data's as NFE grows (the
    variance within 10% at NFE 160)."""
    gaussian = GaussianMixtureDenoiser(dim=4, num_components=1, mean_scale=0.5, std_range=(0.5, 0.5), shape=(1, 2, 2))
    z = torch.randn([2000, 1, 2, 2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    variance_errors = []
    for nfe in (40, 160):
        generator = torch.Generator().manual_seed(4)
        x = SAMPLERS[name](gaussian, z, nfe=nfe, time_steps="loguniform",
                           randn_like=lambda x_: torch.randn(x_.shape, generator=generator, dtype=x_.dtype))
        centered = x.reshape(len(x), -1) - gaussian.means[0]
        assert centered.mean(0).abs().max() < 0.04
        variance_errors.append(abs(centered.var(0).mean().item() / 0.25 - 1))
    assert variance_errors[1] < 0.1 and variance_errors[1] <= variance_errors[0] + 0.02, variance_errors


# ----------------------------------------------------------------------------
# The budget.


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("schedule", ["edm", "loguniform", "polyexponential"])
def test_nfe_bounds_the_network_calls(name, schedule):
    """nfe = N calls the network at most N times, each on the whole batch; a multistep solver uses all N."""
    net = CountingNet(GaussianMixtureDenoiser(dim=4, num_components=3, shape=(1, 2, 2)))
    z = _latents(net.net, 3)
    for nfe in sorted({SAMPLERS[name].solver.min_nfe, 4, 7, 10}):
        net.calls = 0
        SAMPLERS[name](net, z, nfe=nfe, time_steps=schedule)
        assert net.calls <= nfe and net.calls >= nfe - 1, (nfe, net.calls)
        assert all(x.shape[0] == 3 for x in net.inputs)
    too_few = SAMPLERS[name].solver.min_nfe - 1
    with pytest.raises(ValueError, match=f"nfe={too_few}: '{name}' needs at least {SAMPLERS[name].solver.min_nfe} "
                                         f"network calls"):
        SAMPLERS[name](net, z, nfe=too_few, time_steps=schedule)


@pytest.mark.parametrize("name", ["unipc_bh2", "dpmpp_2s"])
def test_optimized_steps_are_searched_once_on_their_own_noise(name, monkeypatch):
    """The search runs once per network and budget, on noise of its own (never the latents being sampled), and is
    not counted: every later call with nfe = N calls the network at most N times. It beats log-uniform steps."""
    monkeypatch.setattr(registry, "SEARCH_REFERENCE_LEVELS", 128)
    monkeypatch.setattr(registry, "SEARCH_MAX_EVALS", 60)
    monkeypatch.setattr(registry, "SEARCH_BATCH", 8)
    mixture = small_mixture()
    net = CountingNet(mixture)
    z = _latents(mixture, 8, seed=5)
    nfe = 9
    x = SAMPLERS[name](net, z, nfe=nfe, time_steps="optimized")
    assert net.calls > 10 * nfe  # The search, then the sampling.
    sampled_inputs = net.inputs[-nfe:]
    assert not any(torch.equal(x_in, z * 80) for x_in in net.inputs[:-nfe])
    assert torch.equal(sampled_inputs[0], z * 80)
    for _ in range(2):
        net.calls = 0
        again = SAMPLERS[name](net, z, nfe=nfe, time_steps="optimized")
        assert net.calls <= nfe and torch.equal(again, x)
    other = CountingNet(mixture)  # Another network object: searched anew.
    SAMPLERS[name](other, z, nfe=nfe, time_steps="optimized")
    assert other.calls > 10 * nfe
    exact = exact_end_points(mixture, z, num_steps=256)
    uniform = SAMPLERS[name](mixture, z, nfe=nfe, time_steps="loguniform")
    assert relative_error(x, exact, mixture.data_scale) < 0.7 * relative_error(uniform, exact, mixture.data_scale)


class GaussianDenoiser:
    """The ideal denoiser of anisotropic Gaussian data N(mean, Sigma) in 4 dimensions (seeded): D(x; sigma) = mean
    + Sigma (Sigma + sigma^2 I)^-1 (x - mean), exactly affine in x."""

    label_dim, sigma_min, sigma_max = 0, 0, float("inf")
    img_channels, img_resolution, shape = 1, 2, (1, 2, 2)

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        root = torch.randn([4, 4], generator=g, dtype=torch.float64) * 0.4
        self.mean = torch.randn([4], generator=g, dtype=torch.float64) * 0.5
        self.covariance = root @ root.T + 0.01 * torch.eye(4, dtype=torch.float64)

    def __call__(self, x, sigma, class_labels=None):
        sigma = float(sigma)
        gain = torch.linalg.solve(self.covariance + sigma ** 2 * torch.eye(4, dtype=torch.float64), self.covariance)
        return (self.mean + (x.reshape(len(x), -1).to(torch.float64) - self.mean) @ gain).reshape(x.shape)


def test_gaussian_first_step_is_the_exact_ode_solution_for_gaussian_data():
    """On Gaussian data the fit from the network's outputs at sigma = 80 recovers the data's mean and covariance,
    and the analytic step from 80 matches a dense RK4 solution of the probability-flow ODE to sigma = 0 (the closed
    form at sigma_to = 0) and, composed, through an intermediate level."""
    net = GaussianDenoiser()
    model = SAMPLERS["unipc_bh2"].gaussian_model(net, 80.0)
    torch.testing.assert_close(model.mean, net.mean, rtol=0, atol=1e-8)
    covariance = model.eigvecs @ torch.diag(model.eigvals) @ model.eigvecs.T
    torch.testing.assert_close(covariance, net.covariance, rtol=0, atol=1e-8)
    z = _latents(net, 6, seed=2)
    exact = exact_end_points(net, z, num_steps=1024, sigma_end=1e-7)
    torch.testing.assert_close(model.transport(z * 80, 80, 0), exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.transport(model.transport(z * 80, 80, 1.5), 1.5, 0), exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.denoise(z, 0.7), net(z, 0.7), rtol=0, atol=1e-9)


def test_gaussian_first_step_fits_once_on_its_own_noise_and_is_not_counted():
    """'NAME+gaussian' with nfe = N: the fit calls the network once per network object, on probes of its own seeds
    (never the latents being sampled) and before the counted calls; sampling then calls it exactly N times, from
    the end of the analytic step on (N + 1 levels of NAME, the first step free)."""
    mixture = small_mixture()
    net = CountingNet(mixture)
    z = _latents(mixture, 8, seed=5)
    nfe, probes = 6, 2 * (4 + 1)
    x = SAMPLERS["dpmpp_3m"](net, z, nfe=nfe, time_steps="loguniform+gaussian")
    assert net.calls == -(-probes // registry.SEARCH_BATCH) + nfe
    expected_probes = draw_latents(mixture, SeedRNG(range(registry.GAUSSIAN_SEED, registry.GAUSSIAN_SEED + probes)))
    torch.testing.assert_close(net.inputs[0], expected_probes.double() * 80, rtol=0, atol=0)
    levels = loguniform_sigma_steps(nfe + 1, 0.002, 80)
    model = SAMPLERS["dpmpp_3m"].gaussian_model(net, 80.0)
    torch.testing.assert_close(net.inputs[-nfe], model.transport(z * 80, 80, float(levels[1])), rtol=0, atol=0)
    for sampler in ("dpmpp_3m", "unipc_bh2", "dpmpp_2s"):  # Cached for the network, whichever sampler.
        net.calls = 0
        SAMPLERS[sampler](net, z, nfe=nfe + 1, time_steps="loguniform+gaussian")
        assert net.calls == nfe + 1, (sampler, net.calls)
    net.calls = 0
    assert torch.equal(SAMPLERS["dpmpp_3m"](net, z, nfe=nfe, time_steps="loguniform+gaussian"), x)
    assert net.calls == nfe
    other = CountingNet(mixture)  # Another network object: fitted anew, by ``levels`` with the other one-time work.
    SAMPLERS["dpmpp_3m"].levels(other, z, nfe, "loguniform+gaussian", 0.002, 80, 7)
    assert other.calls == 1
    SAMPLERS["dpmpp_3m"](other, z, nfe=nfe, time_steps="loguniform+gaussian")
    assert other.calls == 1 + nfe


def test_optimized_search_places_the_end_of_the_gaussian_step(monkeypatch):
    """'optimized+gaussian' searches the switch level with the others: level 0 is sigma_max, level 1 (where the
    solver starts) is free; it costs nfe calls and beats log-uniform steps with the same first step."""
    monkeypatch.setattr(registry, "SEARCH_REFERENCE_LEVELS", 128)
    monkeypatch.setattr(registry, "SEARCH_MAX_EVALS", 60)
    monkeypatch.setattr(registry, "SEARCH_BATCH", 8)
    mixture = small_mixture()
    z = _latents(mixture, 8, seed=5)
    nfe = 6
    levels, gaussian = SAMPLERS["unipc_bh2"].levels(mixture, z, nfe, "optimized+gaussian", 0.002, 80, 7)
    assert gaussian and len(levels) == nfe + 1 and levels[0] == 80 and levels[1] < 80
    net = CountingNet(mixture)
    SAMPLERS["unipc_bh2"].gaussian_model(net, 80.0)
    net.calls = 0
    x = SAMPLERS["unipc_bh2"](net, z, nfe=nfe + 1, time_steps=levels)  # A tensor: the levels as they are.
    exact = exact_end_points(mixture, z, num_steps=256)
    searched = SAMPLERS["unipc_bh2"](mixture, z, nfe=nfe, time_steps="optimized+gaussian")
    assert net.calls == nfe + 1 and not torch.equal(x, searched)  # Without '+gaussian' the first step calls.
    uniform = SAMPLERS["unipc_bh2"](mixture, z, nfe=nfe, time_steps="loguniform+gaussian")
    assert relative_error(searched, exact, mixture.data_scale) < 0.7 * relative_error(uniform, exact,
                                                                                     mixture.data_scale)


def test_guidance_works_with_the_named_samplers():
    """A guided denoiser is a denoiser: D_g + w (D - D_g) with both mixtures' exact denoisers."""
    from training.sampling import GuidedDenoiser
    net, guide = small_mixture(), GaussianMixtureDenoiser(dim=4, num_components=3, seed=1, shape=(1, 2, 2))
    z = _latents(net, 2)
    guided = GuidedDenoiser(net, guide, 2.0)
    x = SAMPLERS["unipc_bh2"](guided, z, nfe=8)

    def by_hand(x_, sigma, class_labels=None):
        return guide(x_, sigma) + 2.0 * (net(x_, sigma) - guide(x_, sigma))
    torch.testing.assert_close(x, SAMPLERS["unipc_bh2"](by_hand, z, nfe=8), rtol=0, atol=1e-12)

# ----------------------------------------------------------------------------
# Formulas.


def test_loguniform_and_polyexponential_steps():
    n, lo, hi = 9, 0.002, 80.0
    log_uniform = loguniform_sigma_steps(n, lo, hi)
    assert log_uniform.dtype == torch.float64 and log_uniform[0] == hi
    assert log_uniform[-1].item() == pytest.approx(lo, rel=1e-12)
    steps = torch.diff(log_uniform.log())
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(lo / hi) / (n - 1)), rtol=1e-12, atol=0)
    for rho in (1, 2, 3.5):
        poly = polyexponential_sigma_steps(n, lo, hi, rho)
        i = np.arange(n)
        expected = np.exp(np.log(lo) + (1 - i / (n - 1)) ** rho * (np.log(hi) - np.log(lo)))
        np.testing.assert_allclose(poly.numpy(), expected, rtol=1e-12)
        assert poly[0].item() == pytest.approx(hi, rel=1e-12) and poly[-1].item() == pytest.approx(lo, rel=1e-12)
    torch.testing.assert_close(polyexponential_sigma_steps(n, lo, hi, 1), log_uniform, rtol=1e-12, atol=0)
    assert sampling.sigma_steps("polyexponential:3", 5, lo, hi).allclose(polyexponential_sigma_steps(5, lo, hi, 3))


def test_warped_steps_with_a_free_first_level_round_trip():
    """WarpedSteps(free_first=True): level 0 is sigma_max, levels 1.. are the warp from the free sigma_1 to
    sigma_end; fitting the warp to [sigma_max] + log-uniform levels from sigma_1 gives them back."""
    from training.sampling.search import WarpedSteps, _fit_warp
    warp = WarpedSteps(7, 0.002, 80, num_knots=4, free_first=True)
    target = torch.cat([torch.tensor([80.0], dtype=torch.float64), loguniform_sigma_steps(6, 0.01, 9.0)])
    params = _fit_warp(warp, target)
    np.testing.assert_allclose(params[-2:], [math.log(0.01), math.log(9.0)], rtol=1e-12)
    torch.testing.assert_close(warp.sigmas(params), target, rtol=1e-9, atol=0)
    assert warp.sigmas(warp.initial())[1].item() == pytest.approx(loguniform_sigma_steps(7, 0.002, 80)[1].item())


def test_exponential_weights_integrate_polynomials_exactly():
    """w_j of DPM-Solver++(kM): for D(lambda) = lambda^m, m < k, sum_j w_j D(lambda_j) = integral e^-(lt - l) D."""
    nodes, lambda_s, lambda_t = [-0.7, -0.3, 0.0], 0.0, 0.45
    weights = solvers.exponential_weights(nodes, lambda_s, lambda_t)
    fine = np.linspace(lambda_s, lambda_t, 200001)
    for m in range(3):
        exact = np.trapezoid(np.exp(-(lambda_t - fine)) * fine ** m, fine)
        assert sum(w * node ** m for w, node in zip(weights, nodes)) == pytest.approx(exact, rel=1e-8, abs=1e-12)
    # DPM-Solver++(2M)'s weights are these to second order: 1 - e^-h split with 1/(2r).
    h = 0.45
    assert sum(solvers.exponential_weights([-0.3, 0.0], 0.0, h)) == pytest.approx(-math.expm1(-h), rel=1e-12)


def test_final_step_extrapolates_in_sigma_squared():
    """D(sigma) = a + b sigma^2 along the trajectory: two points give x(0) = a exactly; one gives D(sigma_min)."""
    a, b = torch.tensor(0.3, dtype=torch.float64), 2.0
    sigmas = [0.05, 0.01]
    values = [a + b * s ** 2 for s in sigmas]
    assert solvers.final_denoised(sigmas, values, points=2).item() == pytest.approx(0.3, abs=1e-15)
    assert solvers.final_denoised(sigmas, values, points=1).item() == pytest.approx(0.3 + b * 1e-4, abs=1e-15)

# ----------------------------------------------------------------------------
# Errors and the command lines.


def test_bad_options_get_one_line_errors():
    net = small_mixture()
    z = _latents(net, 1)
    with pytest.raises(ValueError, match=r"sampler='dpm\+\+': expected one of euler, heun, dpmpp_2m"):
        sampling.sampler_spec(sampler="dpm++", nfe=10)
    with pytest.raises(ValueError, match="time_steps='cosine': expected one of edm, loguniform, polyexponential, "
                                         "optimized"):
        SAMPLERS["dpmpp_2m"](net, z, nfe=10, time_steps="cosine")
    with pytest.raises(ValueError, match="churn .* not to 'unipc_bh2'"):
        SAMPLERS["unipc_bh2"](net, z, nfe=10, S_churn=5)
    with pytest.raises(ValueError, match="^discretization with sampler: the Table 1 ablation sampler's options"):
        sampling.sampler_spec(sampler="dpmpp_2m", discretization="vp")
    with pytest.raises(ValueError, match="'euler_ancestral' draws noise"):
        SAMPLERS["euler_ancestral"](net, z, nfe=10, time_steps="optimized")
    with pytest.raises(ValueError, match="the paper's samplers 'heun' and 'euler' stay as they are"):
        SAMPLERS["heun"](net, z, nfe=9, time_steps="edm+gaussian")
    with pytest.raises(ValueError, match="time_steps='cosine': expected one of"):
        SAMPLERS["dpmpp_2m"](net, z, nfe=10, time_steps="cosine+gaussian")
    with pytest.raises(ValueError, match=r"needs an unconditional one \(label_dim=4\)"):
        SAMPLERS["dpmpp_2m"](make_tiny_net(label_dim=4), torch.zeros([1, 3, 8, 8]), nfe=4,
                             time_steps="loguniform+gaussian")
    with pytest.raises(ValueError, match="fit_gaussian: 4 probes cannot determine an affine map of 4 values"):
        fit_gaussian(z.expand(4, 1, 2, 2), z.expand(4, 1, 2, 2), 80.0)


@pytest.fixture(scope="module")
def network_pkl(tmp_path_factory) -> str:
    from training.checkpoint import save_network_pkl
    path = str(tmp_path_factory.mktemp("net") / "network-snapshot-000000.pkl")
    save_network_pkl(path, dict(ema=make_tiny_net(label_dim=4), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return path


def test_generate_takes_sampler_nfe_and_time_steps(network_pkl, tmp_path):
    import PIL.Image
    from generate import main

    from training.sampling import NamedSampler, PaperSampler, generate_images
    args = ["--network", network_pkl, "--outdir", str(tmp_path), "--seeds", "0-2", "--sampler", "dpmpp_3m",
            "--nfe", "6", "--steps-schedule", "polyexponential:1.5"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "with dpmpp_3m (NFE 6, polyexponential:1.5 steps)" in result.output
    expected = generate_images(make_tiny_net(label_dim=4), [0, 1, 2],
                               sampler=NamedSampler("dpmpp_3m", nfe=6, time_steps="polyexponential:1.5"))
    for seed in range(3):
        png = torch.from_numpy(np.array(PIL.Image.open(tmp_path / f"{seed:06d}.png"))).permute(2, 0, 1)
        assert torch.equal(png, expected[seed])
    # --nfe alone is the paper's Heun: the same images as --steps with 2 steps - 1 = nfe.
    result = CliRunner().invoke(main, ["--network", network_pkl, "--outdir", str(tmp_path / "h"), "--seeds", "0",
                                       "--nfe", "7"], catch_exceptions=False)
    assert "with heun (NFE 7, edm steps)" in result.output
    heun = generate_images(make_tiny_net(label_dim=4), [0], sampler=PaperSampler(num_steps=4))
    png = torch.from_numpy(np.array(PIL.Image.open(tmp_path / "h" / "000000.png"))).permute(2, 0, 1)
    assert torch.equal(png, heun[0])


@pytest.mark.parametrize("args, message", [
    (["--sampler", "dpm"], "Invalid value for '--sampler': 'dpm' is not one of 'euler', 'heun'"),
    (["--steps-schedule", "cosine"], "Invalid value for '--steps-schedule': 'cosine': expected one of edm, "
                                     "loguniform, polyexponential, optimized"),
    (["--sampler", "unipc_bh2", "--disc", "vp"], "Error: --disc with --sampler: the Table 1 ablation sampler's "
                                                 "options do not mix with a named sampler's"),
    (["--sampler", "dpmpp_2s", "--nfe", "2"], "Error: --nfe=2: 'dpmpp_2s' needs at least 3 network calls"),
    (["--sampler", "ipndm", "--S_churn", "5"], "Error: --S_churn/--S_min/--S_max: churn (Algorithm 2) applies to "
                                               "the paper's samplers"),
    (["--steps-schedule", "cosine+gaussian"], "'cosine+gaussian': expected one of edm, loguniform"),
])
def test_generate_bad_sampler_options_get_one_line(network_pkl, tmp_path, args, message):
    from generate import main
    result = CliRunner().invoke(main, ["--network", network_pkl, "--outdir", str(tmp_path / "out"), *args],
                                catch_exceptions=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert re.search(re.escape(message), result.output), result.output


def test_generate_takes_gaussian_schedules():
    from training.cli_options import parse_time_steps
    for value in ("optimized+gaussian", "loguniform+gaussian", "polyexponential:3+gaussian", "edm"):
        assert parse_time_steps(value) == value


def test_generate_fid_calc_and_ema_sweep_share_the_sampler_options():
    """The same declarations (training/cli_options.py): names, defaults and help alike in the three scripts."""
    import ema_sweep
    import fid
    import generate
    from training.cli_options import SAMPLER_OPTIONS

    def declared(command):
        return {p.name: (p.opts, p.default, p.help) for p in command.params}
    ours = declared(generate.main)
    sampler_names = {"num_steps", "sampler", "nfe", "time_steps", "solver", "discretization", "S_churn", "rho", "sigmas"}
    assert len(SAMPLER_OPTIONS) == 16 and sampler_names <= ours.keys()
    for command in (fid.calc, ema_sweep.main):
        theirs = declared(command)
        assert all(theirs[name] == ours[name] for name in sampler_names)
    assert declared(fid.calc)["precision"] == ours["precision"]

# ----------------------------------------------------------------------------
# Watching the steps; solvers called directly.


class StepRecorder:
    """A callback that keeps what it is shown: (i, sigma, x, denoised) of each step."""

    def __init__(self):
        self.steps = []

    def __call__(self, i, sigma, x, denoised):
        self.steps.append((i, float(sigma), x.clone(), denoised.clone()))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_named_sampler_shows_each_step_and_changes_nothing(name):
    """The callback sees steps 0, 1, ... at the sampler's own levels (one per level; the two-stage solvers' midpoints
    are not steps), each with D(x; sigma) of the x it shows, and the images are the same bit for bit. The levels are
    the loguniform ones of the budget, so step i is at level i; the consistency sampler never calls the last,
    sigma_min)."""
    net = GaussianMixtureDenoiser(dim=4, num_components=3, shape=(1, 2, 2))
    z = _latents(net, 3)
    sampler, nfe = SAMPLERS[name], 7
    levels, _ = sampler.levels(net, z, nfe, "loguniform", 0.002, 80, 7)
    plain = sampler(net, z, randn_like=SeedRNG([0, 1, 2]).randn_like, nfe=nfe, time_steps="loguniform")
    seen = StepRecorder()
    watched = sampler(net, z, randn_like=SeedRNG([0, 1, 2]).randn_like, nfe=nfe, time_steps="loguniform",
                      callback=seen)
    assert torch.equal(watched, plain)
    called = levels if sampler.solver.solves_ode else levels[:-1]
    assert [i for i, *_ in seen.steps] == list(range(len(called)))
    assert [sigma for _, sigma, *_ in seen.steps] == pytest.approx(called.tolist(), rel=1e-12)
    for _, sigma, x, denoised in seen.steps:
        assert torch.equal(denoised, net(x, torch.tensor(sigma, dtype=torch.float64)).to(torch.float64))


@pytest.mark.parametrize("kind", ["edm", "edm-churn", "ablation-vp"])
def test_paper_samplers_show_each_step_after_churn(kind):
    """edm_sampler and ablation_sampler call back once per step with the step's start after churn: sigma(t_hat) >=
    sigma_i, and D(x_hat / s(t_hat); sigma(t_hat)) of that x_hat (s = 1 for EDM); the images are unchanged."""
    net = make_tiny_net(label_dim=4)
    rng_seeds = [0, 1, 7]
    latents, labels = draw_latents(net, SeedRNG(rng_seeds)), draw_class_labels(net, SeedRNG(rng_seeds))
    sampler, options = {"edm": (edm_sampler, dict(num_steps=5)),
                        "edm-churn": (edm_sampler, dict(num_steps=5, S_churn=20, S_min=0.05, S_max=30)),
                        "ablation-vp": (ablation_sampler, dict(num_steps=5, solver="euler", discretization="vp",
                                                               schedule="vp", scaling="vp"))}[kind]
    with torch.no_grad():
        plain = sampler(net, latents, labels, SeedRNG(rng_seeds).randn_like, **options)
        seen = StepRecorder()
        watched = sampler(net, latents, labels, SeedRNG(rng_seeds).randn_like, callback=seen, **options)
    assert torch.equal(watched, plain) and [i for i, *_ in seen.steps] == [0, 1, 2, 3, 4]
    sigmas = [sigma for _, sigma, *_ in seen.steps]
    assert sigmas == sorted(sigmas, reverse=True)
    if kind.startswith("edm"):
        levels = sampling.edm_sigma_steps(5, 0.002, 80).tolist()
        assert all(s >= level * (1 - 1e-6) for s, level in zip(sigmas, levels))
        raised = [s > level * 1.1 for s, level in zip(sigmas, levels)]  # Churn raises the levels in [S_min, S_max].
        assert raised == ([False, True, True, True, False] if kind == "edm-churn" else [False] * 5), sigmas
        with torch.no_grad():
            for _, sigma, x, denoised in seen.steps:
                D = net(x, torch.tensor(sigma, dtype=torch.float64), labels).to(torch.float64)
                torch.testing.assert_close(denoised, D, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc_bh2", "ipndm", "lms", "dpmpp_2s"])
def test_a_solver_called_directly_gives_the_samplers_images(name):
    """The primary API, solver(denoise, x, sigmas) with any levels, is what the registry runs: the same images bit
    for bit as SAMPLERS[name] on those levels."""
    net = GaussianMixtureDenoiser(dim=4, num_components=3, shape=(1, 2, 2))
    z = _latents(net, 3)
    sigmas = sampling.discretize("polyexponential", 6, 0.01, 40, rho=3)
    denoise = lambda x, sigma: net(x, sigma).to(torch.float64)  # noqa: E731
    direct = SAMPLERS[name].solver(denoise, z * sigmas[0], sigmas)
    registry = SAMPLERS[name](net, z, nfe=SAMPLERS[name].solver.calls_for(6), time_steps=sigmas)
    assert torch.equal(direct, registry)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_and_schedule_runs_or_is_refused_before_any_call(name, monkeypatch):
    """Every sampler with every schedule, with and without '+gaussian': it samples within its budget, or it is refused
    with a one-line ValueError before the network is called (no search, no fit, no sampling first)."""
    from training.sampling.time_steps import NAMED_TIME_STEPS
    monkeypatch.setattr(registry, "SEARCH_MAX_EVALS", 8)  # The search's path, not its result, is the point here.
    for schedule in [*NAMED_TIME_STEPS, *(f"{s}+gaussian" for s in NAMED_TIME_STEPS)]:
        net = CountingNet(GaussianMixtureDenoiser(dim=4, num_components=2, shape=(1, 2, 2), seed=5))
        z = _latents(net.net, 2)
        nfe = max(SAMPLERS[name].solver.min_nfe, 5)
        try:
            x = SAMPLERS[name](net, z, nfe=nfe, time_steps=schedule)
        except ValueError as e:
            assert net.calls == 0 and "\n" not in str(e), (schedule, net.calls, str(e))
            continue
        assert x.shape == z.shape and bool(torch.isfinite(x).all()), schedule


# ----------------------------------------------------------------------------
# The multistep updates pinned to their formulas on steps of unequal length in lambda (EDM's rho = 7 levels), where
# the ratio of successive steps matters.

class ScriptedDenoiser:
    """Returns a fixed tensor per call, whatever x is: the updates' arithmetic can then be redone exactly."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.outputs[self.calls - 1]


def _scripted(num: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn([2, 1, 2, 2], generator=g, dtype=torch.float64) for _ in range(num)]


def _edm_levels(n: int, rho: float = 7, lo: float = 0.002, hi: float = 80) -> list[float]:
    return [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]


def _lagrange_integral(nodes: list[float], lambda_s: float, lambda_t: float, j: int) -> float:
    """Integral over [lambda_s, lambda_t] of e^-(lambda_t - lambda) l_j(lambda), l_j the Lagrange basis polynomial of
    ``nodes`` (Gauss-Legendre, 40 points: exact to rounding for these smooth integrands)."""
    u, w = np.polynomial.legendre.leggauss(40)
    lam = lambda_s + (u + 1) / 2 * (lambda_t - lambda_s)
    basis = np.prod([(lam - m) / (nodes[j] - m) for k, m in enumerate(nodes) if k != j], axis=0)
    return float(np.sum(w * np.exp(-(lambda_t - lam)) * basis) * (lambda_t - lambda_s) / 2)


def _watched(solver, levels, outputs, **options):
    seen = []
    solver(ScriptedDenoiser(outputs), outputs[0] * 0 + 1.0, torch.tensor(levels, dtype=torch.float64),
           callback=lambda i, sigma, x, D: seen.append(x.clone()), **options)
    return seen


def test_dpmpp_2m_is_its_update_formula_on_unequal_steps():
    """x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^-h - 1) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1}), r = h_{i-1} / h_i,
    h_i = lambda_{i+1} - lambda_i, lambda = -ln sigma; the first step DDIM's."""
    levels, outputs = _edm_levels(7), _scripted(7)
    seen = _watched(solvers.dpmpp_2m, levels, outputs)
    lam = [-math.log(s) for s in levels]
    x = torch.ones_like(outputs[0])
    for i in range(len(levels) - 1):
        torch.testing.assert_close(seen[i], x, rtol=1e-12, atol=1e-12)
        h = lam[i + 1] - lam[i]
        D = outputs[i]
        if i > 0:
            r = (lam[i] - lam[i - 1]) / h
            assert abs(r - 1) > 0.05  # Unequal steps: a wrong r would show.
            D = (1 + 1 / (2 * r)) * outputs[i] - 1 / (2 * r) * outputs[i - 1]
        x = levels[i + 1] / levels[i] * x - math.expm1(-h) * D
    torch.testing.assert_close(seen[-1], x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [3, 4])
def test_dpmpp_km_integrates_the_interpolating_polynomial_exactly(order):
    """DPM-Solver++(kM): x_{i+1} = e^-h x_i + sum_j D_j integral e^-(lambda_{i+1} - lambda) l_j(lambda) dlambda over
    the step, l_j the Lagrange polynomials through the last min(k, i + 1) lambdas (quadrature here)."""
    levels, outputs = _edm_levels(8), _scripted(8, seed=order)
    seen = _watched(partial_solver(order), levels, outputs)
    lam = [-math.log(s) for s in levels]
    x = torch.ones_like(outputs[0])
    for i in range(len(levels) - 1):
        torch.testing.assert_close(seen[i], x, rtol=1e-10, atol=1e-10)
        nodes = lam[max(0, i + 1 - order):i + 1]
        used = outputs[max(0, i + 1 - order):i + 1]
        x = math.exp(-(lam[i + 1] - lam[i])) * x + sum(
            _lagrange_integral(nodes, lam[i], lam[i + 1], j) * D for j, D in enumerate(used))
    torch.testing.assert_close(seen[-1], x, rtol=1e-10, atol=1e-10)


def partial_solver(order: int):
    from functools import partial
    return partial(solvers.exponential_multistep, order=order)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_is_its_predictor_corrector_formula_on_unequal_steps(variant):
    """UniPC with a first-order predictor (Zhao et al. 2023, data prediction) written out: the predictor is DDIM's
    step x_t = e^-h x_s + (1 - e^-h) D_s; once D_t is evaluated, the corrector redoes the step as
    x_t = e^-h x_s + (1 - e^-h) D_s + B(h) (D_t - D_s) / 2 (one difference, r = 1, a = 1/2), B(h) = h ('bh1') or
    1 - e^-h ('bh2'). The steps are unequal in lambda, so h differs at every step."""
    from functools import partial
    levels, outputs = _edm_levels(6), _scripted(6, seed=11)
    seen = _watched(partial(solvers.unipc, predictor_order=1, variant=variant), levels, outputs)
    lam = [-math.log(s) for s in levels]
    B = (lambda h: h) if variant == "bh1" else (lambda h: -math.expm1(-h))
    x = torch.ones_like(outputs[0])
    for i in range(len(levels) - 1):
        torch.testing.assert_close(seen[i], x, rtol=1e-12, atol=1e-12)
        if i > 0:  # Correct the step from i - 1 now that D_i is known.
            h = lam[i] - lam[i - 1]
            x_prev = previous
            x = math.exp(-h) * x_prev - math.expm1(-h) * outputs[i - 1] + B(h) * 0.5 * (outputs[i] - outputs[i - 1])
        previous = x
        h = lam[i + 1] - lam[i]
        x = math.exp(-h) * x - math.expm1(-h) * outputs[i]
    assert len(seen) == len(levels)


def test_rho_reaches_the_named_samplers_edm_levels():
    """--rho with a named sampler on the 'edm' schedule: the levels the solver runs at are Eq. 5's with that rho."""
    from training.sampling import NamedSampler
    net = GaussianMixtureDenoiser(dim=4, num_components=2, shape=(1, 2, 2))
    z = _latents(net, 2)
    for rho in (3.0, 7.0):
        seen = []
        NamedSampler("dpmpp_2m", nfe=6, time_steps="edm", rho=rho).run(
            net, z, callback=lambda i, sigma, x, D: seen.append(float(sigma)))
        assert seen == pytest.approx(_edm_levels(6, rho=rho), rel=1e-12)


@pytest.mark.parametrize("name, levels, calls", [("consistency", (80, 0.821, 0.002), 2), ("dpmpp_2m", (40, 5, 0.5), 3),
                                                 ("heun", (40, 5, 0.5), 5)])
def test_explicit_levels_are_used_as_given_with_their_call_count(name, levels, calls):
    """--sigmas: the solver runs at exactly these levels (the consistency sampler makes no call at its last, sigma_min),
    and the NFE they cost is the spec's unless --nfe says otherwise."""
    from training.sampling import NamedSampler, sampler_spec
    spec = sampler_spec(sampler=name, sigmas=list(levels))
    assert spec == NamedSampler(name, nfe=calls, sigmas=levels) and spec.describe().endswith(
        f"levels {','.join(f'{s:g}' for s in levels)})")
    net = small_mixture()
    calls_made, seen = [], []

    def counted(x, sigma, class_labels=None):
        calls_made.append(float(sigma.reshape(-1)[0]))
        return net(x, sigma, class_labels)
    counted.round_sigma = getattr(net, "round_sigma", None) or (lambda s: s)
    spec.run(counted, _latents(net, 2), callback=lambda i, sigma, x, D: seen.append(float(sigma)))
    assert len(calls_made) == calls
    assert set(calls_made) <= set(levels) and seen[0] == levels[0]
    assert sorted(set(seen), reverse=True) == [s for s in levels if s in seen]


def test_explicit_levels_are_checked_when_the_spec_is_built():
    from training.sampling import sampler_spec
    for options, message in [(dict(sampler="consistency", sigmas=[0.5, 80]), "strictly decreasing"),
                             (dict(sampler="consistency", sigmas=[80]), "two or more"),
                             (dict(sampler="consistency", sigmas=[80, 1, 0.002], nfe=1), "^nfe=1: 3 levels cost"),
                             (dict(sampler="dpmpp_2m", sigmas=[80, 1], time_steps="edm"), "give the levels one way")]:
        with pytest.raises(ValueError, match=message):
            sampler_spec(**options)


def test_generate_takes_explicit_levels(network_pkl, tmp_path):
    from generate import main
    result = CliRunner().invoke(main, ["--network", network_pkl, "--outdir", str(tmp_path), "--seeds", "0",
                                       "--sampler=dpmpp_2m", "--sigmas=40,5,0.5"], catch_exceptions=False)
    assert result.exit_code == 0 and "with dpmpp_2m (NFE 3, levels 40,5,0.5)" in result.output
    result = CliRunner().invoke(main, ["--network", network_pkl, "--outdir", str(tmp_path), "--seeds", "0",
                                       "--sigmas=40,5,0.5", "--steps-schedule=edm"])
    assert result.exit_code != 0 and "Error: --sigmas with --steps-schedule='edm': give the levels one way" in \
        result.output
