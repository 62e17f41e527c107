"""Sampling from a denoiser D(x; sigma): the paper's Algorithms 1 and 2 and the design space of Table 1.

A sampler is a composition of independent choices, each a small named piece here:

- a time-step discretization: noise levels sigma_0 > ... > sigma_{N-1} (``edm_sigma_steps`` is Eq. 5);
- a noise schedule sigma(t) with its derivative and inverse (``vp_schedule``, ``ve_schedule``,
  ``linear_schedule``) and a scaling s(t) (``vp_scaling``, ``no_scaling``), which together fix the
  probability-flow ODE of Eq. 4 (``ProbabilityFlow``);
- a solver step over ``(dx_dt, x, t, t_next)`` (``euler_step``, ``heun_step``);
- optional churn, Algorithm 2's temporary noise increase (``Churn``).

``edm_sampler`` (Algorithm 1 + 2) and ``ablation_sampler`` (any Table 1 column) only pick the pieces and
hand them to ``solve``. The network is a black box called as ``net(x, sigma, class_labels)``; it may carry
``sigma_min``, ``sigma_max`` (its valid range, which the samplers respect) and ``round_sigma`` (the noise
levels it can be evaluated at, e.g. iDDPM's discrete ones).

State is float64 throughout, as in the official implementation: a seed then gives the official image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from training import solvers
from training.solvers import Solver
from training.step_schedules import (ScheduleCache, loguniform_sigma_steps, polyexponential_sigma_steps,
                                     search_sigma_steps)

RandnLike = Callable[[torch.Tensor], torch.Tensor]
ABLATION_OPTIONS = ("solver", "discretization", "schedule", "scaling")

# ----------------------------------------------------------------------------
# Time-step discretizations (Table 1, row "time steps"): N noise levels, decreasing, float64.


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = _step_ramp(num_steps, device)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def vp_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """VP: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma(t_i) with the VP schedule spanning the range."""
    t = 1 + _step_ramp(num_steps, device) * (epsilon_s - 1)
    return vp_schedule(*vp_betas_for_range(sigma_min, sigma_max, epsilon_s)).sigma(t)


def ve_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """VE: t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma_i = sqrt(t_i) (geometric)."""
    t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** _step_ramp(num_steps, device)
    return t.sqrt()


def iddpm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, C_1: float = 0.001, C_2: float = 0.008,
                      M: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """iDDPM: N of the discrete levels u_j that lie in [sigma_min, sigma_max], evenly spaced in index.

    The official sampler takes indices round((len - 1)/(N - 1) i) of the restricted table, not the paper's
    j0 formula; outputs match the official ones only this way.
    """
    u = iddpm_levels(M, C_1, C_2, device)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    index = ((len(u) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64, device=u.device))
    return u[index.round().to(torch.int64)]


def iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """iDDPM's levels u_0 > ... > u_M = 0 (Table 1): u_{j-1} = sqrt((u_j^2 + 1) / max(a_{j-1}/a_j, C_1) - 1),
    a_j = sin^2(pi/2 j / (M (C_2 + 1))). Float64, except the ratios, which the official sampler forms in
    float32 (integer step indices promote to the default dtype); which levels survive the range filter
    depends on it."""
    j = torch.arange(M + 1, device=device)
    alpha_bar = (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    for k in range(M, 0, -1):
        u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
    return u


def _step_ramp(num_steps: int, device) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1, in float64."""
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: at least 2 steps are needed")
    return torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)


DISCRETIZATIONS = {"vp": vp_sigma_steps, "ve": ve_sigma_steps, "iddpm": iddpm_sigma_steps, "edm": edm_sigma_steps}

# ----------------------------------------------------------------------------
# Noise schedules sigma(t) and scalings s(t) (Table 1, rows "sigma(t)" and "s(t)").


@dataclass(frozen=True)
class Schedule:
    """sigma(t), its derivative sigma'(t) and its inverse t(sigma)."""
    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable


@dataclass(frozen=True)
class Scaling:
    """s(t) and its derivative s'(t)."""
    s: Callable
    s_deriv: Callable


def vp_schedule(beta_d: float = 19.9, beta_min: float = 0.1) -> Schedule:
    """VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    def sigma(t):
        return (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5

    def sigma_deriv(t):
        return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

    def sigma_inv(sigma):
        return ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d

    return Schedule(sigma, sigma_deriv, sigma_inv)


def ve_schedule() -> Schedule:
    """VE: sigma(t) = sqrt(t)."""
    return Schedule(sigma=lambda t: t.sqrt(), sigma_deriv=lambda t: 0.5 / t.sqrt(), sigma_inv=lambda sigma: sigma ** 2)


def linear_schedule() -> Schedule:
    """iDDPM and EDM: sigma(t) = t."""
    return Schedule(sigma=lambda t: t, sigma_deriv=lambda t: 1, sigma_inv=lambda sigma: sigma)


def vp_scaling(schedule: Schedule) -> Scaling:
    """VP: s(t) = 1 / sqrt(1 + sigma(t)^2), following whichever sigma(t) is chosen."""
    def s(t):
        return 1 / (1 + schedule.sigma(t) ** 2).sqrt()

    def s_deriv(t):
        return -schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3)

    return Scaling(s, s_deriv)


def no_scaling(schedule: Schedule | None = None) -> Scaling:
    """VE, iDDPM and EDM: s(t) = 1."""
    return Scaling(s=lambda t: 1, s_deriv=lambda t: 0)


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """beta_d, beta_min of the VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


SCHEDULES = {"vp": vp_schedule, "ve": ve_schedule, "linear": linear_schedule}
SCALINGS = {"vp": vp_scaling, "none": no_scaling}

# ----------------------------------------------------------------------------
# The probability-flow ODE (Eq. 4) and its solvers.


@dataclass(frozen=True)
class ProbabilityFlow:
    """Eq. 4 with the score from the denoiser (Eq. 3), for one choice of sigma(t) and s(t):

        dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t) / sigma(t) D(x / s(t); sigma(t)).
    """
    schedule: Schedule
    scaling: Scaling

    def sigma(self, t):
        return self.schedule.sigma(t)

    def s(self, t):
        return self.scaling.s(t)

    def dx_dt(self, net, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        sigma, s = self.schedule.sigma(t), self.scaling.s(t)
        sigma_deriv, s_deriv = self.schedule.sigma_deriv(t), self.scaling.s_deriv(t)
        denoised = net(x / s, sigma, class_labels).to(torch.float64)
        return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised

    def t_of_sigma(self, net, sigma: torch.Tensor) -> torch.Tensor:
        """The time at which sigma(t) is the nearest noise level the network accepts."""
        return self.schedule.sigma_inv(_round_sigma(net, sigma))


DxDt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_step(dx_dt: DxDt, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """First-order step: x + (t_next - t) dx/dt(x, t)."""
    return x + (t_next - t) * dx_dt(x, t)


def heun_step(dx_dt: DxDt, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """Second-order step (Algorithm 1, lines 4-8; Appendix D.2's generalisation with the second evaluation
    at t + alpha h, weights 1 - 1/(2 alpha) and 1/(2 alpha); alpha = 1 is Heun's method)."""
    h = t_next - t
    d = dx_dt(x, t)
    x_prime, t_prime = x + alpha * h * d, t + alpha * h
    d_prime = dx_dt(x_prime, t_prime)
    return x + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d_prime)


@dataclass(frozen=True)
class Churn:
    """Algorithm 2, lines 5-6: raise the noise level of x by a factor 1 + gamma (gamma = min(S_churn / N,
    sqrt(2) - 1) while S_min <= sigma <= S_max), adding fresh noise scaled by S_noise."""
    S_churn: float = 0
    S_min: float = 0
    S_max: float = float("inf")
    S_noise: float = 1

    def gamma(self, sigma: float, num_steps: int) -> float:
        return min(self.S_churn / num_steps, np.sqrt(2) - 1) if self.S_min <= sigma <= self.S_max else 0

    def gammas(self, flow: ProbabilityFlow, t_steps: torch.Tensor) -> list[float]:
        """gamma_i for every step, decided once on the host from the float64 noise levels, so the sampler
        loop never waits for the device to compare a noise level with S_min and S_max."""
        num_steps = len(t_steps) - 1
        return [self.gamma(sigma, num_steps) for sigma in flow.sigma(t_steps[:-1].cpu()).tolist()]

    def apply(self, net, flow: ProbabilityFlow, x: torch.Tensor, t: torch.Tensor, gamma: float,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, t_hat). In t, for any sigma(t) and s(t): x_hat = s(t_hat)/s(t) x + sqrt(sigma(t_hat)^2 -
        sigma(t)^2) s(t_hat) S_noise z."""
        sigma = flow.sigma(t)
        t_hat = flow.t_of_sigma(net, sigma + gamma * sigma)
        added_std = (flow.sigma(t_hat) ** 2 - sigma ** 2).clip(min=0).sqrt()
        x_hat = flow.s(t_hat) / flow.s(t) * x + added_std * flow.s(t_hat) * self.S_noise * noise
        return x_hat, t_hat


def solve(net, latents: torch.Tensor, class_labels: torch.Tensor | None, t_steps: torch.Tensor,
          flow: ProbabilityFlow, step: Callable, churn: Churn = Churn(),
          randn_like: RandnLike = torch.randn_like) -> torch.Tensor:
    """Integrate the ODE from t_0 to t_N = 0 (Algorithm 1 with Algorithm 2's churn).

    x_0 = z sigma(t_0) s(t_0). Each step applies churn, then ``step``; the last step, to sigma = 0, is always
    Euler. Churn noise is drawn at every step (multiplied by 0 when gamma is 0), as the official samplers do,
    so each seed's random stream, and hence its image, matches theirs.
    """
    num_steps = len(t_steps) - 1
    x = latents.to(torch.float64) * (flow.sigma(t_steps[0]) * flow.s(t_steps[0]))
    gammas = churn.gammas(flow, t_steps)

    def dx_dt(x_, t_):
        return flow.dx_dt(net, x_, t_, class_labels)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = churn.apply(net, flow, x, t_cur, gammas[i], randn_like(x))
        x = (step if i < num_steps - 1 else euler_step)(dx_dt, x_hat, t_hat, t_next)
    return x


def _round_sigma(net, sigma: torch.Tensor) -> torch.Tensor:
    round_sigma = getattr(net, "round_sigma", None)
    return torch.as_tensor(round_sigma(sigma) if round_sigma is not None else sigma, dtype=torch.float64)


def _clip_to_network_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    return max(sigma_min, getattr(net, "sigma_min", 0)), min(sigma_max, getattr(net, "sigma_max", float("inf")))


def _append_zero(t_steps: torch.Tensor) -> torch.Tensor:
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

# ----------------------------------------------------------------------------
# The two samplers of the official release.


def edm_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: RandnLike = torch.randn_like, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80, rho: float = 7, S_churn: float = 0, S_min: float = 0,
                S_max: float = float("inf"), S_noise: float = 1) -> torch.Tensor:
    """The paper's sampler: Heun's method on the Eq. 5 steps with sigma(t) = t, s(t) = 1 (Algorithm 1), plus
    churn when S_churn > 0 (Algorithm 2). ``latents``: [N, C, H, W] unit Gaussian noise. Returns float64 images."""
    sigma_min, sigma_max = _clip_to_network_range(net, sigma_min, sigma_max)
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = _append_zero(_round_sigma(net, sigmas))
    flow = ProbabilityFlow(linear_schedule(), no_scaling())
    return solve(net, latents, class_labels, t_steps, flow, heun_step, Churn(S_churn, S_min, S_max, S_noise),
                 randn_like)


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """The noise level range each discretization uses unless told otherwise (before clipping to the network)."""
    if discretization == "vp":
        vp = vp_schedule(beta_d=19.9, beta_min=0.1)
        return float(vp.sigma(epsilon_s)), float(vp.sigma(1.0))
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


def ablation_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                     randn_like: RandnLike = torch.randn_like, num_steps: int = 18, sigma_min: float | None = None,
                     sigma_max: float | None = None, rho: float = 7, solver: str = "heun",
                     discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                     epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                     alpha: float = 1, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
                     S_noise: float = 1) -> torch.Tensor:
    """Any combination of Table 1: ``solver`` 'heun' | 'euler', ``discretization`` 'vp' | 've' | 'iddpm' |
    'edm', ``schedule`` (sigma(t)) 'vp' | 've' | 'linear', ``scaling`` (s(t)) 'vp' | 'none'; integrates Eq. 4
    in t. The VP column is solver='euler', discretization='vp', schedule='vp', scaling='vp'; VE is
    euler/ve/ve/none; iDDPM+DDIM is euler/iddpm/linear/none; EDM is heun/edm/linear/none."""
    _check_choice("solver", solver, ("heun", "euler"))
    _check_choice("discretization", discretization, DISCRETIZATIONS)
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("scaling", scaling, SCALINGS)
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min, sigma_max = _clip_to_network_range(net, default_min if sigma_min is None else sigma_min,
                                                  default_max if sigma_max is None else sigma_max)

    device = latents.device
    sigmas = {
        "vp": lambda: vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s, device=device),
        "ve": lambda: ve_sigma_steps(num_steps, sigma_min, sigma_max, device=device),
        "iddpm": lambda: iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1, C_2, M, device=device),
        "edm": lambda: edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device),
    }[discretization]()
    # The VP schedule spans the same (clipped) range as the VP discretization.
    sigma_of_t = vp_schedule(*vp_betas_for_range(sigma_min, sigma_max, epsilon_s)) if schedule == "vp" else SCHEDULES[schedule]()
    flow = ProbabilityFlow(sigma_of_t, SCALINGS[scaling](sigma_of_t))
    t_steps = _append_zero(flow.t_of_sigma(net, sigmas))

    step = euler_step if solver == "euler" else (lambda dx_dt, x, t, t_next: heun_step(dx_dt, x, t, t_next, alpha))
    return solve(net, latents, class_labels, t_steps, flow, step, Churn(S_churn, S_min, S_max, S_noise), randn_like)


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}='{value}': expected one of {', '.join(choices)}")

# ----------------------------------------------------------------------------
# Samplers by name (``SAMPLERS``): a solver (``training.solvers``) on a time-step schedule, within a budget of
# network calls. Each is called like ``edm_sampler`` plus ``nfe`` (at most that many calls of ``net``, each on the
# whole batch) and ``steps_schedule``; latents are scaled by the first level, sigma_max, and the result is x at
# sigma = 0.

STEPS_SCHEDULES = ("edm", "loguniform", "polyexponential", "optimized")
GAUSSIAN_SUFFIX = "+gaussian"  # 'NAME+gaussian': the schedule's first step is analytic (``Sampler.gaussian_model``).
SEARCH_SEED, SEARCH_BATCH, SEARCH_REFERENCE_LEVELS, SEARCH_MAX_EVALS = 2024, 32, 512, 300
SEARCH_SWITCHES = (0.1, 0.15, 0.2, 0.25, 0.3)  # '+gaussian' search starts: switch at sigma_max (sigma_min / sigma_max)^f.
GAUSSIAN_SEED = 4048  # The Gaussian fit's probes: seeds GAUSSIAN_SEED.., 2 (dim + 1) of them.
OPTIMIZED_SCHEDULES = ScheduleCache()


def split_steps_schedule(steps_schedule: str) -> tuple[str, bool]:
    """('NAME', analytic first step?) of 'NAME' or 'NAME+gaussian'."""
    if steps_schedule.endswith(GAUSSIAN_SUFFIX):
        return steps_schedule[:-len(GAUSSIAN_SUFFIX)], True
    return steps_schedule, False


def sigma_steps(steps_schedule: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The levels of a named schedule: 'edm' (Eq. 5 with ``rho``), 'loguniform', 'polyexponential' (exponent 2)
    or 'polyexponential:P' (exponent P). 'optimized' depends on a network: see ``Sampler``."""
    name, _, argument = steps_schedule.partition(":")
    if name == "polyexponential":
        return polyexponential_sigma_steps(num_steps, sigma_min, sigma_max, float(argument or 2), device=device)
    if argument:
        raise ValueError(f"steps_schedule='{steps_schedule}': only polyexponential takes a value (polyexponential:P)")
    if name == "edm":
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)
    if name == "loguniform":
        return loguniform_sigma_steps(num_steps, sigma_min, sigma_max, device=device)
    raise ValueError(f"steps_schedule='{steps_schedule}': expected one of {', '.join(STEPS_SCHEDULES)}")


@dataclass(frozen=True)
class Sampler:
    """``solver`` on the levels of ``steps_schedule`` (its default). With ``paper_step`` (``euler_step`` or
    ``heun_step``) it runs the paper's ``solve``, churn included: 'heun' on the 'edm' schedule with nfe = 2N - 1 is
    ``edm_sampler`` with num_steps = N, bit for bit.

    'NAME+gaussian' schedules take an analytic first step: N + 1 levels of NAME (the switch level sigma_1 searched
    with the rest for 'optimized+gaussian'), the step from sigma_0 = sigma_max to sigma_1 the closed-form ODE
    solution of the Gaussian with the data's mean and covariance (``solvers.GaussianData``, fitted once per network
    on its own noise by ``gaussian_model``, its calls not counted), the solver from sigma_1 on with the N calls."""
    solver: Solver
    steps_schedule: str = "edm"
    paper_step: Callable | None = None

    def __call__(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                 randn_like: RandnLike = torch.randn_like, nfe: int = 35,
                 steps_schedule: str | torch.Tensor | None = None, sigma_min: float = 0.002, sigma_max: float = 80,
                 rho: float = 7, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
                 S_noise: float = 1) -> torch.Tensor:
        """Sample with at most ``nfe`` calls of ``net``. ``steps_schedule``: a name of ``STEPS_SCHEDULES``, with
        '+gaussian' or not, or a decreasing tensor of levels (its length decides the calls). Returns float64
        images [N, C, H, W]."""
        name = self.name
        churn = Churn(S_churn, S_min, S_max, S_noise)
        if self.paper_step is None and churn != Churn(S_noise=S_noise):
            raise ValueError(f"S_churn/S_min/S_max: churn (Algorithm 2) applies to the paper's samplers 'heun' and "
                             f"'euler', not to '{name}'")
        sigmas, gaussian = self.levels(net, latents, nfe, steps_schedule, sigma_min, sigma_max, rho)
        if self.paper_step is not None:
            flow = ProbabilityFlow(linear_schedule(), no_scaling())
            return solve(net, latents, class_labels, _append_zero(sigmas), flow, self.paper_step, churn, randn_like)
        return self.sample(net, latents, class_labels, sigmas, gaussian, randn_like)

    def sample(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None, sigmas: torch.Tensor,
               gaussian: bool = False, randn_like: RandnLike = torch.randn_like) -> torch.Tensor:
        """The solver on ``sigmas`` from x = latents sigmas[0]; with ``gaussian``, x first goes from sigmas[0]
        to sigmas[1] analytically (``gaussian_model``) and the network is called from sigmas[1] on."""
        def denoise(x, sigma):
            return net(x, sigma, class_labels).to(torch.float64)

        x = latents.to(torch.float64) * sigmas[0]
        if gaussian:
            model = self.gaussian_model(net, float(sigmas[0]), latents.device)
            x, sigmas = model.transport(x, float(sigmas[0]), float(sigmas[1])), sigmas[1:]
        return self.solver(denoise, x, sigmas, randn_like)

    @property
    def name(self) -> str:
        return next((name for name, sampler in SAMPLERS.items() if sampler is self), "sampler")

    def levels(self, net, latents: torch.Tensor, nfe: int, steps_schedule: str | torch.Tensor | None,
               sigma_min: float, sigma_max: float, rho: float) -> tuple[torch.Tensor, bool]:
        """(the noise levels, analytic first step?): levels snapped to the network's ``round_sigma``, float64 on
        the latents' device; checks that they cost at most ``nfe`` calls (the first step's none if analytic). Runs
        the one-time work, cached per network: the 'optimized' search, the Gaussian fit of '+gaussian'."""
        steps_schedule = self.steps_schedule if steps_schedule is None else steps_schedule
        gaussian = False
        if isinstance(steps_schedule, torch.Tensor):
            sigmas = steps_schedule.to(torch.float64)
        else:
            steps_schedule, gaussian = split_steps_schedule(steps_schedule)
            if gaussian and (self.paper_step is not None):
                raise ValueError(f"steps_schedule='{steps_schedule}{GAUSSIAN_SUFFIX}': the paper's samplers "
                                 f"'heun' and 'euler' stay as they are; '{self.name}' takes no analytic first step")
            if nfe < self.solver.min_nfe:
                raise ValueError(f"nfe={nfe}: '{self.name}' needs at least {self.solver.min_nfe} network calls")
            sigma_min, sigma_max = _clip_to_network_range(net, sigma_min, sigma_max)
            num_levels = self.solver.levels_for(nfe) + gaussian
            if steps_schedule == "optimized":
                sigmas = self.optimized_levels(net, num_levels, sigma_min, sigma_max, rho, gaussian)
            else:
                sigmas = sigma_steps(steps_schedule, num_levels, sigma_min, sigma_max, rho)
        sigmas = _round_sigma(net, sigmas.to(latents.device))
        if len(sigmas) < 2 + gaussian or not bool(torch.all(sigmas[1:] < sigmas[:-1])) or float(sigmas[-1]) <= 0:
            raise ValueError(f"steps_schedule: the noise levels must be positive and strictly decreasing "
                             f"(after the network's rounding), got {sigmas.tolist()}")
        calls = self.solver.calls_for(len(sigmas) - gaussian)
        if calls > nfe:
            raise ValueError(f"nfe={nfe}: {len(sigmas)} noise levels cost '{self.name}' {calls} network calls")
        if gaussian:  # The one-time fit, here with the search, so that sampling then makes only the counted calls.
            self.gaussian_model(net, float(sigmas[0]), latents.device)
        return sigmas, gaussian

    def optimized_levels(self, net, num_levels: int, sigma_min: float, sigma_max: float, rho: float,
                         gaussian: bool = False) -> torch.Tensor:
        """``search_sigma_steps`` for this sampler and ``net``, once per network and options (``OPTIMIZED_SCHEDULES``).
        The search draws its own noise (and labels) from ``SEARCH_SEED``; its calls are not part of any ``nfe``.
        With ``gaussian`` the first level is sigma_max and the second, where the analytic step ends, is searched
        too."""
        if self.solver.stochastic:
            raise ValueError(f"steps_schedule='optimized': '{self.name}' draws noise; the search fits deterministic "
                             f"samplers only")
        key = (self, num_levels, sigma_min, sigma_max) + (("gaussian",) if gaussian else ())
        return OPTIMIZED_SCHEDULES.get(net, key, lambda: self._search(net, num_levels, sigma_min, sigma_max, rho,
                                                                      gaussian))

    @torch.no_grad()
    def _search(self, net, num_levels: int, sigma_min: float, sigma_max: float, rho: float,
                gaussian: bool) -> torch.Tensor:
        parameters = net.parameters() if hasattr(net, "parameters") else ()
        rng = SeedRNG(range(SEARCH_SEED, SEARCH_SEED + SEARCH_BATCH), next((p.device for p in parameters), "cpu"))
        latents, labels = draw_latents(net, rng), draw_class_labels(net, rng)
        reference_levels = loguniform_sigma_steps(SEARCH_REFERENCE_LEVELS, sigma_min, sigma_max)
        reference = OPTIMIZED_SCHEDULES.get(  # One reference solve per network serves every sampler and budget.
            net, ("reference", SEARCH_SEED, SEARCH_BATCH, SEARCH_REFERENCE_LEVELS, sigma_min, sigma_max),
            lambda: SAMPLERS["unipc_bh2"](net, latents, labels, nfe=SEARCH_REFERENCE_LEVELS,
                                          steps_schedule=reference_levels))

        def error(sigmas: torch.Tensor) -> float:
            x = self.sample(net, latents, labels, _round_sigma(net, sigmas.to(latents.device)), gaussian)
            return float((x - reference).square().mean().sqrt())

        shapes = ("edm", "polyexponential") + (("loguniform",) if gaussian else ())
        switches = [sigma_max * (sigma_min / sigma_max) ** f for f in SEARCH_SWITCHES] if gaussian else [sigma_max]
        starts = [torch.cat([torch.full([int(gaussian)], sigma_max, dtype=torch.float64),
                             sigma_steps(name, num_levels - gaussian, sigma_min, switch, rho)])
                  for name in shapes for switch in switches]
        return search_sigma_steps(error, num_levels, sigma_min, sigma_max, starts, max_evals=SEARCH_MAX_EVALS,
                                  free_first=gaussian)

    def gaussian_model(self, net, sigma: float, device: torch.device | str = "cpu") -> solvers.GaussianData:
        """The Gaussian whose ideal denoiser best matches ``net`` at ``sigma`` (``solvers.fit_gaussian``): ``net``
        called once per network and level (cached in ``OPTIMIZED_SCHEDULES``) on 2 (dim + 1) probes x = sigma z of
        its own noise (seeds from ``GAUSSIAN_SEED``, never the latents being sampled), in batches of
        ``SEARCH_BATCH``; none of these calls is part of any ``nfe``. Conditional networks are not supported."""
        if getattr(net, "label_dim", 0):
            raise ValueError(f"'+gaussian': the analytic first step fits one Gaussian per network and needs an "
                             f"unconditional one (label_dim={net.label_dim})")
        return OPTIMIZED_SCHEDULES.get(net, ("gaussian", GAUSSIAN_SEED, sigma, str(device)),
                                       lambda: self._fit_gaussian(net, sigma, device))

    @staticmethod
    @torch.no_grad()
    def _fit_gaussian(net, sigma: float, device) -> solvers.GaussianData:
        dim = net.img_channels * net.img_resolution * net.img_resolution
        seeds = range(GAUSSIAN_SEED, GAUSSIAN_SEED + 2 * (dim + 1))
        probes, denoised = [], []
        for start in range(0, len(seeds), SEARCH_BATCH):
            x = draw_latents(net, SeedRNG(seeds[start:start + SEARCH_BATCH], device)).to(torch.float64) * sigma
            probes.append(x)
            denoised.append(net(x, torch.as_tensor(sigma, dtype=torch.float64, device=device), None).to(torch.float64))
        return solvers.fit_gaussian(torch.cat(probes), torch.cat(denoised), sigma)


SAMPLERS: dict[str, Sampler] = {
    # The paper's (Algorithm 1): Euler and Heun on Eq. 5's steps.
    "euler": Sampler(Solver(None, order=1), paper_step=euler_step),
    "heun": Sampler(Solver(None, calls_per_step=2, order=2), paper_step=heun_step),
    # Data prediction in lambda = -log(sigma): DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023).
    "dpmpp_2m": Sampler(Solver(solvers.dpmpp_2m, order=2)),
    "dpmpp_3m": Sampler(Solver(solvers.exponential_multistep, order=3, kwargs=(("order", 3),))),
    "dpmpp_4m": Sampler(Solver(solvers.exponential_multistep, order=4, kwargs=(("order", 4),))),
    "dpmpp_2s": Sampler(Solver(solvers.dpmpp_2s, calls_per_step=2, order=2)),
    "unipc_bh1": Sampler(Solver(solvers.unipc, order=4, kwargs=(("order", 3), ("variant", "bh1")))),
    "unipc_bh2": Sampler(Solver(solvers.unipc, order=4, kwargs=(("order", 3), ("variant", "bh2")))),
    # Adams-Bashforth on the EDM slopes (x - D) / sigma: iPNDM (Zhang & Chen 2023), LMS (variable steps).
    # iPNDM's order is 4 in the interior, but its first-order start limits the global order (3 measured over
    # 32-128 calls on equal steps from sigma = 2; asymptotically 2 unless the start is at sigma >> sigma_data).
    "ipndm": Sampler(Solver(solvers.ipndm, order=3)),
    "lms": Sampler(Solver(solvers.adams_sigma, order=4)),
    # Stochastic: ancestral Euler, and the DPM-Solver++ SDEs (eta = 1).
    "euler_ancestral": Sampler(Solver(solvers.euler_ancestral, order=1, stochastic=True)),
    "dpmpp_2m_sde": Sampler(Solver(solvers.exponential_multistep, order=2, stochastic=True,
                                   kwargs=(("order", 2), ("eta", 1.0)))),
    "dpmpp_3m_sde": Sampler(Solver(solvers.exponential_multistep, order=3, stochastic=True,
                                   kwargs=(("order", 3), ("eta", 1.0)))),
}
REGISTRY_OPTIONS = ("sampler", "nfe", "steps_schedule")


def get_sampler(name: str) -> Sampler:
    """``SAMPLERS[name]``, or a one-line error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler='{name}': expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_sampler_options(sampler_kwargs: dict) -> None:
    """One-line ValueErrors, before any work: a named sampler mixed with the Table 1 ablation's options, or an
    unknown sampler name."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if not any(k in kwargs for k in REGISTRY_OPTIONS):
        return
    mixed = [k for k in ABLATION_OPTIONS + ("alpha", "epsilon_s", "C_1", "C_2", "M") if k in kwargs]
    if mixed:
        raise ValueError(f"{', '.join(mixed)}: options of the Table 1 ablation sampler, which does not mix with "
                         f"the named samplers (sampler/nfe/steps_schedule)")
    get_sampler(kwargs.get("sampler") or "heun")


def registry_call(net, latents: torch.Tensor, class_labels: torch.Tensor | None, randn_like: RandnLike,
                  sampler: str | None = None, nfe: int | None = None, num_steps: int | None = None,
                  **options) -> torch.Tensor:
    """``SAMPLERS[sampler]`` (default 'heun') with ``nfe`` calls at most; without ``nfe``, the budget of the paper's
    Heun with ``num_steps`` steps, 2 num_steps - 1 (35 by default)."""
    check_sampler_options(dict(options, sampler=sampler, nfe=nfe))
    nfe = nfe if nfe is not None else 2 * (num_steps or 18) - 1
    return get_sampler(sampler or "heun")(net, latents, class_labels, randn_like=randn_like, nfe=nfe, **options)


def describe_sampler(sampler_kwargs: dict) -> str:
    """What ``run_sampler`` runs with these options, for messages: 'edm_sampler', 'ablation_sampler' or
    'NAME (NFE n, SCHEDULE steps)'."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if any(k in kwargs for k in REGISTRY_OPTIONS):
        name = kwargs.get("sampler") or "heun"
        nfe = kwargs.get("nfe") or 2 * kwargs.get("num_steps", 18) - 1
        schedule = kwargs.get("steps_schedule") or get_sampler(name).steps_schedule
        return f"{name} (NFE {nfe}, {schedule} steps)"
    return "ablation_sampler" if any(k in kwargs for k in ABLATION_OPTIONS) else "edm_sampler"

# ----------------------------------------------------------------------------
# Seeds, latents and class labels as the official generate.py draws them.


class SeedRNG:
    """One ``torch.Generator`` per seed (seeded with seed mod 2^32, on ``device``); every draw of shape
    [N, ...] gives image i the draw of shape [...] from seed i's generator. A seed's stream therefore does not
    depend on which other seeds share its batch."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _per_seed(self, size, draw: Callable[[list[int], torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``draw(one image's shape, generator)`` for every seed, stacked; ``size[0]`` must be the seed count."""
        batch, *item_shape = list(size) or [None]
        if batch != len(self.generators):
            raise ValueError(f"first dimension {batch} != number of seeds {len(self.generators)}")
        return torch.stack([draw(item_shape, generator) for generator in self.generators])

    def randn(self, size, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Unit Gaussian noise of shape ``size``, row i from seed i."""
        on = device or self.device
        return self._per_seed(size, lambda shape, gen: torch.randn(shape, generator=gen, dtype=dtype, device=on))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """``randn`` with the shape, dtype and device of ``x``."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size, device: torch.device | str | None = None) -> torch.Tensor:
        """Integers in [0, high) of shape ``size``, row i from seed i."""
        on = device or self.device
        return self._per_seed(size, lambda shape, gen: torch.randint(high, size=shape, generator=gen, device=on))


def draw_latents(net, rng: SeedRNG) -> torch.Tensor:
    """Per seed, the first draw: unit Gaussian noise [C, H, W] (float32)."""
    return rng.randn([len(rng.generators), net.img_channels, net.img_resolution, net.img_resolution])


BALANCED = "balanced"  # As a class: seed s gets class s mod the class count.


def draw_class_labels(net, rng: SeedRNG, class_idx: int | str | None = None) -> torch.Tensor | None:
    """Per seed, the second draw for a conditional network: a one-hot label of a uniformly drawn class. With
    ``class_idx`` every label becomes that class, and with ``BALANCED`` seed s gets class s mod the class count,
    so consecutive seeds cover the classes equally often (the random draws' class counts differ from a balanced
    reference's by about sqrt(n / classes) each, which a metric such as FID counts as error). Either way the draw
    is still made, so later draws stay aligned."""
    label_dim = getattr(net, "label_dim", 0)
    if not label_dim:
        if class_idx is not None:
            raise ValueError(f"class {class_idx} requested, but the network is unconditional")
        return None
    labels = torch.eye(label_dim, device=rng.device)[rng.randint(label_dim, size=[len(rng.generators)])]
    if class_idx == BALANCED:
        return torch.eye(label_dim, device=rng.device)[[seed % label_dim for seed in rng.seeds]]
    if class_idx is not None:
        if not isinstance(class_idx, int) or not 0 <= class_idx < label_dim:
            raise ValueError(f"class {class_idx} is out of range: the network has classes 0..{label_dim - 1}")
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


# ----------------------------------------------------------------------------
# Guidance: a denoiser made of two, which every sampler above takes as its ``net``.

UNCONDITIONAL = "uncond"  # The guide of classifier-free guidance: the network itself without its label.


class GuidedDenoiser:
    """D_w(x; sigma) = D_g(x; sigma) + w (D(x; sigma) - D_g(x; sigma)) for a guiding denoiser D_g.

    ``guide`` is another network (autoguidance, Karras et al. 2024: a smaller or less-trained version of ``net``)
    or ``UNCONDITIONAL`` (classifier-free guidance, Ho and Salimans 2022: ``net`` itself with a zero label
    vector, as trained with label dropout; both evaluated in one batched call). With ``interval`` = (sigma_lo,
    sigma_hi) the guidance applies only at noise levels inside it (Kynkaanniemi et al. 2024), and the guide is
    not called outside, which needs the noise level on the host (one device read per call). w = 1 is ``net``
    alone, bit for bit, and never calls the guide.

    Calls as the networks do, ``D_w(x, sigma, class_labels)``; other attributes (sigma range, ``round_sigma``,
    image shape, ``label_dim``, parameters) are those of ``net``.
    """

    def __init__(self, net, guide, weight: float, interval: tuple[float, float] | None = None):
        if isinstance(guide, str) and guide == UNCONDITIONAL:
            if not getattr(net, "label_dim", 0):
                raise ValueError("classifier-free guidance needs a class-conditional network (label_dim > 0); "
                                 "guide an unconditional one with another network (autoguidance)")
            guide = UNCONDITIONAL
        if interval is not None and not 0 <= interval[0] < interval[1]:
            raise ValueError(f"guidance interval {interval}: expected 0 <= sigma_lo < sigma_hi")
        self.net, self.guide, self.weight, self.interval = net, guide, float(weight), interval

    def __getattr__(self, name: str):
        return getattr(self.__dict__["net"], name)

    def _guided_at(self, sigma) -> bool:
        if self.weight == 1:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        value = float(torch.as_tensor(sigma).reshape(-1)[0])
        return lo <= value <= hi

    def __call__(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if not self._guided_at(sigma):
            return self.net(x, sigma, class_labels, **kwargs)
        if self.guide is UNCONDITIONAL:
            D, D_g = self._with_and_without_labels(x, sigma, class_labels, **kwargs)
        else:
            D, D_g = self.net(x, sigma, class_labels, **kwargs), self.guide(x, sigma, class_labels, **kwargs)
        return D_g.to(D.dtype).lerp(D, self.weight)

    def _with_and_without_labels(self, x, sigma, class_labels, **kwargs):
        """D(x; sigma, labels) and D(x; sigma, 0) from one call on the doubled batch."""
        n = x.shape[0]
        labels = torch.zeros([n, self.net.label_dim], device=x.device) if class_labels is None else \
            class_labels.to(torch.float32).reshape(-1, self.net.label_dim).expand(n, -1)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(-1).expand(n).repeat(2) if sigma.numel() in (1, n) else sigma
        both = self.net(torch.cat([x, x]), sigma, torch.cat([labels, torch.zeros_like(labels)]), **kwargs)
        return both[:n], both[n:]


def guided(net, guide=None, weight: float = 1, interval: tuple[float, float] | None = None):
    """``net`` itself when there is nothing to guide with (no guide, or w = 1), else its ``GuidedDenoiser``."""
    if guide is None or weight == 1:
        return net
    return GuidedDenoiser(net, guide, weight, interval)


def run_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: RandnLike = torch.randn_like, **sampler_kwargs) -> torch.Tensor:
    """A named sampler of ``SAMPLERS`` when any of sampler/nfe/steps_schedule is given (``registry_call``), else
    ``ablation_sampler`` when any of solver/discretization/schedule/scaling is given, else ``edm_sampler``.
    Options set to None are left at the sampler's default."""
    sampler_kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if any(k in sampler_kwargs for k in REGISTRY_OPTIONS):
        return registry_call(net, latents, class_labels, randn_like, **sampler_kwargs)
    sampler = ablation_sampler if any(k in sampler_kwargs for k in ABLATION_OPTIONS) else edm_sampler
    return sampler(net, latents, class_labels, randn_like=randn_like, **sampler_kwargs)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 as saved to PNG: (x * 127.5 + 128).clip(0, 255), truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_images(net, seeds: Sequence[int], class_idx: int | str | None = None,
                    device: torch.device | str | None = None, **sampler_kwargs) -> torch.Tensor:
    """Images for ``seeds`` exactly as generate.py saves them: uint8 [len(seeds), C, H, W] on ``device``
    (default: the network's). Each image depends only on its seed, the network and the sampler options."""
    if len(seeds) == 0:
        raise ValueError("no seeds given")
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu")) if hasattr(net, "parameters") else "cpu"
    rng = SeedRNG(seeds, device)
    latents = draw_latents(net, rng)
    class_labels = draw_class_labels(net, rng, class_idx)
    return to_uint8(run_sampler(net, latents, class_labels, randn_like=rng.randn_like, **sampler_kwargs))
