"""Samplers: the official vectors, seed determinism, and convergence on a problem with a known answer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import build_official_case, make_tiny_net
from training import sampling
from training.sampling import (BALANCED, NOISE_SCHEDULES, PAPER_TIME_STEPS, SAMPLERS, SCALINGS, Churn, PaperSampler,
                               SeedRNG, ablation_sampler, draw_class_labels, draw_latents, edm_sampler, generate_images,
                               sampler_spec, to_uint8)

pytestmark = pytest.mark.usefixtures("single_thread")


class GaussianDenoiser:
    """The exact denoiser for data ~ N(mu, sigma_data^2 I): D(x; sigma) = mu + sigma_data^2/(sigma_data^2 +
    sigma^2) (x - mu). The probability-flow ODE then has the closed-form solution ``exact_flow``."""

    img_channels, img_resolution, label_dim = 1, 4, 0

    def __init__(self, mu: float = 0.3, sigma_data: float = 0.5):
        self.mu, self.sigma_data = mu, sigma_data

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.mu + self.sigma_data ** 2 / (self.sigma_data ** 2 + sigma ** 2) * (x - self.mu)

    def exact_flow(self, x, sigma_from: float, sigma_to: float):
        """x(sigma_to) given x(sigma_from): the distance to mu scales with sqrt(sigma_data^2 + sigma^2)."""
        ratio = math.sqrt(self.sigma_data ** 2 + sigma_to ** 2) / math.sqrt(self.sigma_data ** 2 + sigma_from ** 2)
        return self.mu + ratio * (x - self.mu)


def _unit_noise(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

# ----------------------------------------------------------------------------
# The official vectors.


def test_the_time_step_table_holds_each_discretizations_parameters_and_range():
    """Table 1's four columns and the named samplers' two more, each with its own parameters (keywords of its
    builder) and, for Table 1's, the paper's default range; the dispatchers read the table, and refuse a parameter
    that is not the discretization's."""
    import inspect

    from training.sampling.time_steps import TIME_STEPS, own_parameters
    assert PAPER_TIME_STEPS == ("vp", "ve", "iddpm", "edm")
    assert set(TIME_STEPS) == {"vp", "ve", "iddpm", "edm", "loguniform", "polyexponential"}
    for name, entry in TIME_STEPS.items():
        assert set(entry.params) <= set(inspect.signature(entry.build).parameters), name
    vp = sampling.vp_schedule(19.9, 0.1)
    assert sampling.default_sigma_range("vp") == pytest.approx((float(vp.sigma(1e-3)), float(vp.sigma(1.0))))
    assert [sampling.default_sigma_range(name) for name in ("ve", "iddpm", "edm")] == [(0.02, 100), (0.002, 81),
                                                                                      (0.002, 80)]
    assert own_parameters("iddpm", dict(rho=7, C_1=0.001, M=1000, epsilon_s=1e-3)) == dict(C_1=0.001, M=1000)
    with pytest.raises(ValueError, match="time steps 've': takes no parameters, not rho"):
        sampling.discretize("ve", 5, 0.02, 100, rho=7)
    with pytest.raises(ValueError, match="not one of Table 1's"):
        sampling.default_sigma_range("loguniform")
    assert torch.equal(sampling.sigma_steps("polyexponential:3", 6, 0.01, 40),
                       sampling.discretize("polyexponential", 6, 0.01, 40, rho=3))
    assert torch.equal(sampling.sigma_steps("edm", 6, 0.01, 40, rho=5), sampling.edm_sigma_steps(6, 0.01, 40, 5))


def test_seeds_draw_the_official_latents_and_labels(official_vectors):
    """Seed s's latents are the first torch.randn of a generator seeded with s mod 2^32 (the official
    StackedRandomGenerator's rule), exactly; they are the official code's numbers to the rounding of torch's Gaussian
    kernel, whose vectorised Box-Muller (AVX2, AVX-512) gave the saved bits and whose scalar one
    (ATEN_CPU_CAPABILITY=default) differs from them by up to 1.5e-6; the class labels are integers, equal everywhere."""
    case = official_vectors["EDMPrecond-DDPM++-cond"]
    golden = case["edm_sampler"]
    net = build_official_case(case)
    rng = SeedRNG(golden["seeds"])
    latents = draw_latents(net, rng)
    by_rule = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed % 2**32))
                           for seed in golden["seeds"]])
    assert torch.equal(latents, by_rule)
    torch.testing.assert_close(latents, golden["latents"], rtol=0, atol=1e-5)
    assert torch.equal(draw_class_labels(net, rng), golden["class_labels"])


def test_edm_sampler_reproduces_the_official_images(official_vectors):
    case = official_vectors["EDMPrecond-DDPM++-cond"]
    golden = case["edm_sampler"]
    net = build_official_case(case)
    with torch.no_grad():
        images = edm_sampler(net, golden["latents"], golden["class_labels"], num_steps=golden["num_steps"])
    assert images.dtype == torch.float64
    torch.testing.assert_close(images, golden["images_float"], rtol=0, atol=1e-5)
    uint8 = generate_images(net, golden["seeds"], sampler=PaperSampler(num_steps=golden["num_steps"]))
    # The official uint8 images, except where an official float lies within the float tolerance of a level boundary
    # (the nearest is 4.9e-7 away, the kernels of AVX-512, AVX2 and SSE4.1 CPUs 2.4e-7 off): there either level.
    low, high = to_uint8(golden["images_float"] - 1e-5), to_uint8(golden["images_float"] + 1e-5)
    assert torch.equal(to_uint8(golden["images_float"]), golden["images_uint8"]) and (low != high).sum() < 20
    assert uint8.dtype == torch.uint8 and torch.equal(torch.where(low == high, uint8, golden["images_uint8"]),
                                                      golden["images_uint8"])
    assert ((uint8 == low) | (uint8 == high)).all()

# ----------------------------------------------------------------------------
# Determinism: a seed's image does not depend on its batch.


@pytest.mark.parametrize("sampler_kwargs", [dict(num_steps=4, S_churn=20),
                                            dict(num_steps=4, S_churn=20, solver="euler", discretization="vp",
                                                 schedule="vp", scaling="vp")],
                         ids=["edm", "ablation"])
def test_same_seed_same_image_for_any_batch_size(sampler_kwargs):
    net = make_tiny_net()
    seeds = [0, 1, 2, 3, 4, 5, 6, 2**32 + 7]
    whole = generate_images(net, seeds, sampler=sampler_spec(**sampler_kwargs))
    for batch in (1, 3):
        parts = [generate_images(net, seeds[i:i + batch], sampler=sampler_spec(**sampler_kwargs))
                 for i in range(0, len(seeds), batch)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole[0], whole[1])
    # Seeds are taken mod 2^32, as the official generate.py does.
    assert torch.equal(generate_images(net, [7], sampler=sampler_spec(**sampler_kwargs))[0], whole[7])


def test_class_option_overrides_labels_but_keeps_the_random_stream():
    net = make_tiny_net(label_dim=4)
    rng_free, rng_fixed = SeedRNG([3, 4]), SeedRNG([3, 4])
    free = (draw_latents(net, rng_free), draw_class_labels(net, rng_free))
    fixed = (draw_latents(net, rng_fixed), draw_class_labels(net, rng_fixed, class_idx=2))
    assert torch.equal(free[0], fixed[0])
    assert torch.equal(fixed[1], torch.eye(4)[[2, 2]])
    # The label draw happened in both, so the churn noise that follows is the same.
    assert torch.equal(rng_free.randn([2, 5]), rng_fixed.randn([2, 5]))
    with pytest.raises(ValueError, match="out of range"):
        draw_class_labels(net, SeedRNG([0]), class_idx=4)
    with pytest.raises(ValueError, match="unconditional"):
        draw_class_labels(make_tiny_net(label_dim=0), SeedRNG([0]), class_idx=0)


def test_balanced_classes_are_seed_mod_classes_and_keep_the_random_stream():
    net = make_tiny_net(label_dim=4)
    seeds = [0, 1, 2, 3, 4, 5, 6, 7, 13, 2**32 + 2]
    rng_free, rng_balanced = SeedRNG(seeds), SeedRNG(seeds)
    free = (draw_latents(net, rng_free), draw_class_labels(net, rng_free))
    balanced = (draw_latents(net, rng_balanced), draw_class_labels(net, rng_balanced, class_idx=BALANCED))
    assert torch.equal(free[0], balanced[0])
    assert balanced[1].argmax(dim=1).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 1, 2]
    assert torch.equal(balanced[1].sum(dim=1), torch.ones(len(seeds)))
    assert torch.equal(rng_free.randn([len(seeds), 5]), rng_balanced.randn([len(seeds), 5]))
    # Each image is the one its class would give it, whatever batch it is made in.
    sampler = PaperSampler(num_steps=4, sigma_max=5, churn=Churn(S_churn=10))
    whole = generate_images(net, [5, 6, 11], class_idx=BALANCED, sampler=sampler)
    for i, seed in enumerate([5, 6, 11]):
        assert torch.equal(whole[i], generate_images(net, [seed], class_idx=seed % 4, sampler=sampler)[0])
    with pytest.raises(ValueError, match="unconditional"):
        draw_class_labels(make_tiny_net(label_dim=0), SeedRNG([0]), class_idx=BALANCED)

# ----------------------------------------------------------------------------
# Convergence on Gaussian data, where the exact solution is known.


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_convergence_order(solver, order):
    """Euler's global error falls as N^-1 and Heun's as N^-2 (Section 3). The final step to sigma = 0 is Euler in
    both, so the reference is the exact flow down to sigma_min followed by that same last step, D(x; sigma_min)."""
    net = GaussianDenoiser()
    sigma_min, sigma_max = 0.002, 80
    z = _unit_noise([2, 1, 4, 4])
    reference = net(net.exact_flow(z * sigma_max, sigma_max, sigma_min), sigma_min)
    errors = []
    for num_steps in (16, 32, 64, 128):
        x = ablation_sampler(net, z, num_steps=num_steps, solver=solver, sigma_min=sigma_min, sigma_max=sigma_max)
        errors.append((x - reference).abs().max().item())
    slopes = -np.diff(np.log2(errors))
    assert np.all(np.abs(slopes - order) < 0.25), f"{solver}: errors {errors}, slopes {slopes}"
    if solver == "heun":  # edm_sampler is this same Heun sampler.
        torch.testing.assert_close(edm_sampler(net, z, num_steps=128), x, rtol=0, atol=1e-12)


TABLE_1_COLUMNS = {  # (solver, discretization, schedule, scaling) of each column of Table 1.
    "VP": ("euler", "vp", "vp", "vp"), "VE": ("euler", "ve", "ve", "none"),
    "iDDPM": ("euler", "iddpm", "linear", "none"), "EDM": ("heun", "edm", "linear", "none"),
}


@pytest.mark.parametrize("solver, discretization, schedule, scaling",
                         list(itertools.product(("euler", "heun"), PAPER_TIME_STEPS, NOISE_SCHEDULES, SCALINGS)))
def test_every_table_1_combination_converges_to_the_exact_solution(solver, discretization, schedule, scaling):
    """Any sigma(t), s(t) and {t_i} solve the same ODE (Eq. 4): all must approach x(0) as N grows."""
    net = GaussianDenoiser()
    z = _unit_noise([1, 1, 2, 2], seed=1)
    choice = dict(solver=solver, discretization=discretization, schedule=schedule, scaling=scaling)
    default_max = sampling.default_sigma_range(discretization)[1]
    exact = net.exact_flow(z * default_max, default_max, 0)
    scale = (exact - net.mu).abs().max()
    coarse, fine = [((ablation_sampler(net, z, num_steps=n, **choice) - exact).abs().max() / scale).item()
                    for n in (32, 128)]
    # 4x the steps: Euler's error shrinks ~4x, Heun's ~16x, down to the floor set by the final Euler step.
    assert fine < 0.35 * coarse or fine < 2e-3, f"relative error {coarse:.3g} at 32 steps, {fine:.3g} at 128"
    if (solver, discretization, schedule, scaling) in TABLE_1_COLUMNS.values():
        assert fine < 0.2  # VE's Euler is the slowest of the four (the paper's Fig. 2); EDM's is ~1e-3.


@pytest.mark.parametrize("flow", [dict(), dict(solver="heun", discretization="vp", schedule="vp", scaling="vp")],
                         ids=["edm", "vp-scaled"])
def test_churn_keeps_the_marginal_distribution(flow):
    """Algorithm 2 replaces part of the noise at every step; with S_noise = 1 the samples keep the data's
    mean and variance, but lose their correlation with the deterministic samples of the same latents."""
    net = GaussianDenoiser(mu=0.3, sigma_data=0.5)
    z = _unit_noise([1, 1, 200, 200])
    generator = torch.Generator().manual_seed(1)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype)

    deterministic = ablation_sampler(net, z, num_steps=128, **flow)
    stochastic = ablation_sampler(net, z, randn_like=randn_like, num_steps=128, S_churn=40, **flow)
    assert abs(stochastic.mean().item() - 0.3) < 0.01
    assert abs(stochastic.var().item() / 0.25 - 1) < 0.04
    assert abs(np.corrcoef(stochastic.flatten(), deterministic.flatten())[0, 1]) < 0.2
    # Too much fresh noise (S_noise > 1) inflates the variance: the check above can fail.
    noisy = ablation_sampler(net, z, randn_like=randn_like, num_steps=128, S_churn=40, S_noise=1.1, **flow)
    assert noisy.var().item() / 0.25 > 1.1


def test_churn_window_and_noise_draw_per_step():
    """gamma = min(S_churn/N, sqrt(2)-1) only inside [S_min, S_max]; noise is drawn at every step regardless."""
    net = GaussianDenoiser()
    sigmas_seen, draws = [], []

    def recording_net(x, sigma, class_labels=None):
        sigmas_seen.append(float(sigma))
        return net(x, sigma)

    def randn_like(x):
        draws.append(x.shape)
        return torch.zeros_like(x)

    num_steps = 6
    t_steps = sampling.edm_sigma_steps(num_steps, 0.002, 80)
    edm_sampler(recording_net, _unit_noise([1, 1, 2, 2]), randn_like=randn_like, num_steps=num_steps,
                S_churn=100, S_min=0.05, S_max=10)
    assert len(draws) == num_steps
    first_evals = [sigmas_seen[2 * i] for i in range(num_steps)]  # Heun: 2 evaluations per step, 1 on the last.
    for t, t_hat in zip(t_steps.tolist(), first_evals):
        expected = t * math.sqrt(2) if 0.05 <= t <= 10 else t
        assert t_hat == pytest.approx(expected, rel=1e-12)


def test_round_sigma_and_network_range_are_honoured():
    """Noise levels are snapped to the network's discrete levels (iDDPM) and clipped to its range."""
    levels = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    seen = []

    class DiscreteNet(GaussianDenoiser):
        sigma_min, sigma_max = 0.01, 10.0

        def round_sigma(self, sigma):
            sigma = torch.as_tensor(sigma)
            return levels[(sigma.reshape(-1, 1) - levels).abs().argmin(1)].reshape(sigma.shape).to(sigma.dtype)

        def __call__(self, x, sigma, class_labels=None):
            seen.append(float(sigma))
            return super().__call__(x, sigma)

    for kwargs in (dict(), dict(discretization="iddpm", solver="euler"), dict(discretization="ve", schedule="ve")):
        seen.clear()
        sampler = ablation_sampler if kwargs else edm_sampler
        sampler(DiscreteNet(), _unit_noise([1, 1, 2, 2]), num_steps=5, **kwargs)
        assert max(seen) <= 10.0 + 1e-9 and min(seen) >= 0.01 - 1e-12
        assert all(min(abs(s - level) for level in levels.tolist()) < 1e-9 for s in seen), seen


def test_edm_time_steps_follow_eq_5():
    sigmas = sampling.edm_sigma_steps(18, 0.002, 80, rho=7)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 18
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-1].item() == pytest.approx(0.002)
    # Evenly spaced in sigma^(1/rho).
    assert torch.allclose(torch.diff(sigmas ** (1 / 7)), torch.full([17], (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17,
                                                                       dtype=torch.float64))


def test_vp_discretization_spans_the_requested_range():
    sigmas = sampling.vp_sigma_steps(10, 0.01, 50, epsilon_s=1e-3)
    assert sigmas[0].item() == pytest.approx(50, rel=1e-9) and sigmas[-1].item() == pytest.approx(0.01, rel=1e-9)
    assert torch.all(torch.diff(sigmas) < 0)


def test_bad_options_are_named():
    net = GaussianDenoiser()
    with pytest.raises(ValueError, match="discretization='cosine'"):
        ablation_sampler(net, _unit_noise([1, 1, 2, 2]), discretization="cosine")
    with pytest.raises(ValueError, match="num_steps=1"):
        edm_sampler(net, _unit_noise([1, 1, 2, 2]), num_steps=1)


@pytest.mark.parametrize("schedule", ["vp", "ve", "linear"])
@pytest.mark.parametrize("scaling", ["vp", "none"])
def test_schedule_derivatives_and_inverses(schedule, scaling):
    """sigma^-1(sigma(t)) = t, and sigma'(t), s'(t) match central finite differences."""
    sigma_of_t = NOISE_SCHEDULES[schedule]()
    s_of_t = SCALINGS[scaling](sigma_of_t)
    t = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    h = 1e-6
    torch.testing.assert_close(sigma_of_t.sigma_inv(sigma_of_t.sigma(t)), t, rtol=1e-9, atol=0)
    fd_sigma = (sigma_of_t.sigma(t + h) - sigma_of_t.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(torch.as_tensor(sigma_of_t.sigma_deriv(t), dtype=torch.float64).expand(3), fd_sigma,
                               rtol=1e-6, atol=1e-9)
    fd_s = (torch.as_tensor(s_of_t.s(t + h)) - torch.as_tensor(s_of_t.s(t - h))) / (2 * h)
    torch.testing.assert_close(torch.as_tensor(s_of_t.s_deriv(t), dtype=torch.float64).expand(3),
                               fd_s.to(torch.float64).expand(3), rtol=1e-6, atol=1e-9)


def test_iddpm_steps_are_network_levels_in_range():
    from training.networks import iddpm_sigma_levels
    levels = iddpm_sigma_levels(1000, 0.001, 0.008).to(torch.float64)  # what iDDPMPrecond.round_sigma snaps to
    steps = sampling.iddpm_sigma_steps(18, 0.002, 81)
    assert len(steps) == 18 and torch.all(torch.diff(steps) < 0)
    assert steps[0] <= 81 and steps[-1] >= 0.002
    nearest = levels[(steps.reshape(-1, 1) - levels).abs().argmin(1)]
    torch.testing.assert_close(steps, nearest, rtol=1e-4, atol=0)  # The network keeps its table in float32.
    # The ends are the extreme levels inside the range; the steps are evenly spaced in index.
    inside = levels[(levels >= 0.002) & (levels <= 81)]
    torch.testing.assert_close(steps[[0, -1]], inside[[0, -1]], rtol=1e-4, atol=0)


def test_ve_time_steps_are_table_1_geometric():
    """Table 1, VE: sigma_i = sqrt(sigma_max^2 (sigma_min^2 / sigma_max^2)^(i / (N - 1))), written out here."""
    N, sigma_min, sigma_max = 12, 0.02, 100.0
    i = np.arange(N)
    expected = np.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (N - 1)))
    np.testing.assert_allclose(sampling.ve_sigma_steps(N, sigma_min, sigma_max).double().numpy(), expected, rtol=1e-6)


def test_vp_time_steps_are_table_1_with_the_schedule_spanning_the_range():
    """Table 1, VP: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sqrt(exp(beta_d t_i^2 / 2 + beta_min t_i) - 1), with
    beta_d, beta_min solved here (2x2 linear system) so that sigma(1) = sigma_max and sigma(epsilon_s) = sigma_min."""
    N, sigma_min, sigma_max, eps = 10, 0.01, 50.0, 1e-3
    # beta_d t^2 / 2 + beta_min t = ln(sigma^2 + 1) at t = 1 and t = eps.
    beta_d, beta_min = np.linalg.solve([[0.5, 1.0], [0.5 * eps ** 2, eps]],
                                       [np.log(sigma_max ** 2 + 1), np.log(sigma_min ** 2 + 1)])
    t = 1 + np.arange(N) / (N - 1) * (eps - 1)
    expected = np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)
    actual = sampling.vp_sigma_steps(N, sigma_min, sigma_max, epsilon_s=eps).double().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    assert actual[0] == pytest.approx(sigma_max, rel=1e-5) and actual[-1] == pytest.approx(sigma_min, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 0.75, 2.0])
def test_generalised_second_order_step_for_alpha_other_than_one(alpha):
    """Appendix D.2's step with its second evaluation at t + alpha h: exact for dx/dt = t (any alpha), and a local
    error that falls 8x per halving of h (third order) for dx/dt = x t, x(t) = x0 exp((t^2 - t0^2) / 2)."""
    x0, t0 = torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    for h in (0.5, 0.1):
        step = sampling.heun_step(lambda x, t: t.expand_as(x), x0, t0, t0 + h, alpha=alpha)
        assert step.item() == pytest.approx(x0.item() + ((t0 + h) ** 2 - t0 ** 2).item() / 2, rel=1e-12)
    errors = []
    for h in (0.1, 0.05, 0.025):
        t1 = t0 + h
        step = sampling.heun_step(lambda x, t: x * t, x0, t0, t1, alpha=alpha)
        errors.append(abs(step - x0 * torch.exp((t1 ** 2 - t0 ** 2) / 2)).item())
    assert all(6 < a / b < 10 for a, b in zip(errors, errors[1:])), errors


def test_the_sampler_spec_is_one_rule():
    """Options name one sampler: any of the named samplers' options, a NamedSampler (heun by default); else any
    option only the ablation sampler has, an AblationSampler; else a PaperSampler. None means not given; the two
    kinds do not mix. Each spec runs the sampler it names, with the options given and the defaults of the rest."""
    from training.sampling import AblationSampler, NamedSampler, spec_record

    cases = [({}, PaperSampler()), (dict(num_steps=5, S_churn=10), PaperSampler(5, churn=Churn(S_churn=10))),
             (dict(solver="euler"), AblationSampler(solver="euler")), (dict(alpha=0.75), AblationSampler(alpha=0.75)),
             (dict(epsilon_s=1e-4, num_steps=4), AblationSampler(4, epsilon_s=1e-4)),
             (dict(discretization="vp", sigma_max=50), AblationSampler(sigma_max=50, time_steps="vp")),
             (dict(nfe=7), NamedSampler("heun", nfe=7)), (dict(sampler="dpmpp_2m"), NamedSampler("dpmpp_2m", nfe=35)),
             (dict(sampler="lms", num_steps=5, rho=3), NamedSampler("lms", nfe=9, rho=3)),
             (dict(time_steps="loguniform", S_noise=1.01), NamedSampler(nfe=35, time_steps="loguniform",
                                                                        churn=Churn(S_noise=1.01))),
             (dict(solver=None, nfe=None, num_steps=5), PaperSampler(num_steps=5))]
    for options, spec in cases:
        assert sampler_spec(**options) == spec, options
    assert [sampler_spec(**o).describe() for o in ({}, dict(scaling="vp"), dict(nfe=7),
                                                   dict(sampler="lms", num_steps=5))] == [
        "edm_sampler", "ablation_sampler", "heun (NFE 7, edm steps)", "lms (NFE 9, edm steps)"]
    assert spec_record(PaperSampler(4)) == dict(kind="PaperSampler", num_steps=4, sigma_min=0.002, sigma_max=80,
                                                rho=7, churn=dict(S_churn=0, S_min=0, S_max="inf", S_noise=1))

    # Checked when built, one line naming the option.
    for options, message in [(dict(nfe=7, discretization="vp"), "^discretization with nfe: the Table 1 ablation"),
                             (dict(sampler="dpm"), "^sampler='dpm': expected one of"),
                             (dict(sampler="dpmpp_2m", nfe=1), "^nfe=1: 'dpmpp_2m' needs at least 2"),
                             (dict(solver="rk4"), "^solver='rk4': expected one of heun, euler"),
                             (dict(num_steps=1), "^num_steps=1: at least 2"),
                             (dict(sigma_min=1, sigma_max=0.5), "^sigma_min=1, sigma_max=0.5: expected sigma_min <"),
                             (dict(time_steps="cosine"), "^time_steps='cosine': expected one of"),
                             (dict(sampler="dpmpp_2m", S_churn=4), "^S_churn/S_min/S_max: churn")]:
        with pytest.raises(ValueError, match=message):
            sampler_spec(**options)

    net = make_tiny_net(label_dim=0)
    latents = draw_latents(net, SeedRNG([3, 4]))
    with torch.no_grad():
        chosen = sampler_spec(alpha=0.75, num_steps=4, discretization="vp").run(net, latents)
        assert torch.equal(chosen, ablation_sampler(net, latents, alpha=0.75, num_steps=4, discretization="vp"))
        churned = sampler_spec(num_steps=4, S_churn=10, S_min=0.1).run(net, latents, randn_like=lambda x: x * 0 + 1)
        assert torch.equal(churned, edm_sampler(net, latents, num_steps=4, S_churn=10, S_min=0.1,
                                                randn_like=lambda x: x * 0 + 1))
        named = sampler_spec(sampler="dpmpp_2m", nfe=5, sigma_max=20).run(net, latents)
        assert torch.equal(named, SAMPLERS["dpmpp_2m"](net, latents, nfe=5, sigma_max=20))
