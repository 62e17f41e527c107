"""The paper's samplers: Algorithms 1 and 2 and the design space of Table 1.

A sampler is a composition of independent choices, each a small named piece:

- the time steps: noise levels sigma_0 > ... > sigma_{N-1} (``time_steps``; ``edm_sigma_steps`` is Eq. 5);
- a noise schedule sigma(t) and a scaling s(t) (``noise_schedules``), which together fix the probability-flow ODE
  of Eq. 4 (``ProbabilityFlow``);
- a solver step over ``(dx_dt, x, t, t_next)`` (``euler_step``, ``heun_step``);
- optional churn, Algorithm 2's temporary noise increase (``Churn``).

``edm_sampler`` (Algorithm 1 + 2) and ``ablation_sampler`` (any Table 1 column) only pick the pieces and hand them
to ``solve``. The network is a black box called as ``net(x, sigma, class_labels)``; it may carry ``sigma_min``,
``sigma_max`` (its valid range, which the samplers respect) and ``round_sigma`` (the noise levels it can be evaluated
at, e.g. iDDPM's discrete ones).

State is float64 throughout, as in the official implementation: a seed then gives the official image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from training.sampling.noise_schedules import (NOISE_SCHEDULES, SCALINGS, NoiseSchedule, Scaling, linear_schedule,
                                               no_scaling, vp_betas_for_range, vp_schedule)
from training.sampling.solvers import RandnLike, StepCallback
from training.sampling.time_steps import (DEFAULT_NUM_STEPS, PAPER_TIME_STEPS, default_sigma_range, discretize,
                                          edm_sigma_steps, own_parameters)

# ----------------------------------------------------------------------------
# The probability-flow ODE (Eq. 4) and its solver steps.


@dataclass(frozen=True)
class ProbabilityFlow:
    """Eq. 4 with the score from the denoiser (Eq. 3), for one choice of sigma(t) and s(t):

        dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t) / sigma(t) D(x / s(t); sigma(t)).
    """
    schedule: NoiseSchedule
    scaling: Scaling

    def sigma(self, t):
        return self.schedule.sigma(t)

    def s(self, t):
        return self.scaling.s(t)

    def dx_dt(self, net, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.slope_and_denoised(net, x, t, class_labels)[0]

    def slope_and_denoised(self, net, x: torch.Tensor, t: torch.Tensor,
                           class_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx/dt, D(x / s(t); sigma(t))): the slope and the denoised image it was computed from."""
        sigma, s = self.schedule.sigma(t), self.scaling.s(t)
        sigma_deriv, s_deriv = self.schedule.sigma_deriv(t), self.scaling.s_deriv(t)
        denoised = net(x / s, sigma, class_labels).to(torch.float64)
        return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised, denoised

    def t_of_sigma(self, net, sigma: torch.Tensor) -> torch.Tensor:
        """The time at which sigma(t) is the nearest noise level the network accepts."""
        return self.schedule.sigma_inv(round_sigma(net, sigma))


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
          randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
    """Integrate the ODE from t_0 to t_N = 0 (Algorithm 1 with Algorithm 2's churn), from x_0 = z sigma(t_0) s(t_0)
    for the unit noise z = ``latents`` (``integrate``)."""
    x = latents.to(torch.float64) * (flow.sigma(t_steps[0]) * flow.s(t_steps[0]))
    return integrate(net, x, class_labels, t_steps, flow, step, churn, randn_like, callback)


def integrate(net, x: torch.Tensor, class_labels: torch.Tensor | None, t_steps: torch.Tensor,
              flow: ProbabilityFlow, step: Callable, churn: Churn = Churn(),
              randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
    """Integrate the ODE from x (float64) at t_0 to t_N = 0 (Algorithm 1 with Algorithm 2's churn).

    Each step applies churn, then ``step``; the last step, to sigma = 0, is always Euler. Churn noise is drawn at
    every step (multiplied by 0 when gamma is 0), as the official samplers do, so each seed's random stream, and
    hence its image, matches theirs. ``callback(i, sigma, x, denoised)`` sees each step's start after churn:
    sigma(t_hat), x_hat and the step's first D(x_hat / s; sigma(t_hat)).
    """
    num_steps = len(t_steps) - 1
    gammas = churn.gammas(flow, t_steps)
    step_denoised = []  # D of each slope in the current step.

    def dx_dt(x_, t_):
        slope, denoised = flow.slope_and_denoised(net, x_, t_, class_labels)
        step_denoised.append(denoised)
        return slope

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = churn.apply(net, flow, x, t_cur, gammas[i], randn_like(x))
        step_denoised.clear()
        x = (step if i < num_steps - 1 else euler_step)(dx_dt, x_hat, t_hat, t_next)
        if callback is not None:
            callback(i, flow.sigma(t_hat), x_hat, step_denoised[0])
    return x


class _DenoiserAsNetwork:
    """A solver's ``denoise(x, sigma)`` called as ``integrate`` calls a network, with the network's
    ``round_sigma`` where it has one (churn's raised levels are snapped by it)."""

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 rounding: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.denoise = denoise
        if rounding is not None:
            self.round_sigma = rounding

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.denoise(x, sigma)


def heun(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
         randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None, churn: Churn = Churn(),
         round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Algorithm 1 (with ``churn``, Algorithm 2) as a solver of ``solvers``' API: Heun steps in sigma(t) = t,
    s(t) = 1 between the levels ``sigmas`` from x at sigmas[0], then an Euler step to sigma = 0. ``round_sigma``: the
    network's, for churn's raised levels. On ``edm_sigma_steps`` it is ``edm_sampler``, bit for bit."""
    return _paper_levels(heun_step, denoise, x, sigmas, randn_like, callback, churn, round_sigma)


def euler(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
          randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None, churn: Churn = Churn(),
          round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``heun`` with Euler steps throughout (Table 1's first-order solver)."""
    return _paper_levels(euler_step, denoise, x, sigmas, randn_like, callback, churn, round_sigma)


def _paper_levels(step: Callable, denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike,
                  callback: StepCallback | None, churn: Churn, rounding) -> torch.Tensor:
    flow = ProbabilityFlow(linear_schedule(), no_scaling())
    return integrate(_DenoiserAsNetwork(denoise, rounding), x, None, append_zero(sigmas), flow, step, churn,
                     randn_like, callback)


def round_sigma(net, sigma: torch.Tensor) -> torch.Tensor:
    """The network's nearest valid noise levels (its ``round_sigma``; any level if it has none), float64."""
    rounding = getattr(net, "round_sigma", None)
    return torch.as_tensor(rounding(sigma) if rounding is not None else sigma, dtype=torch.float64)


def clip_to_network_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """[sigma_min, sigma_max] within the network's ``sigma_min``/``sigma_max``, where it has them."""
    return max(sigma_min, getattr(net, "sigma_min", 0)), min(sigma_max, getattr(net, "sigma_max", float("inf")))


def append_zero(t_steps: torch.Tensor) -> torch.Tensor:
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

# ----------------------------------------------------------------------------
# The two samplers of the official release.


def edm_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: RandnLike = torch.randn_like, num_steps: int = DEFAULT_NUM_STEPS, sigma_min: float = 0.002,
                sigma_max: float = 80, rho: float = 7, S_churn: float = 0, S_min: float = 0,
                S_max: float = float("inf"), S_noise: float = 1,
                callback: StepCallback | None = None) -> torch.Tensor:
    """The paper's sampler: Heun's method on the Eq. 5 steps with sigma(t) = t, s(t) = 1 (Algorithm 1), plus
    churn when S_churn > 0 (Algorithm 2). ``latents``: [N, C, H, W] unit Gaussian noise. Returns float64 images."""
    sigma_min, sigma_max = clip_to_network_range(net, sigma_min, sigma_max)
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = append_zero(round_sigma(net, sigmas))
    flow = ProbabilityFlow(linear_schedule(), no_scaling())
    return solve(net, latents, class_labels, t_steps, flow, heun_step, Churn(S_churn, S_min, S_max, S_noise),
                 randn_like, callback)


def ablation_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                     randn_like: RandnLike = torch.randn_like, num_steps: int = DEFAULT_NUM_STEPS,
                     sigma_min: float | None = None,
                     sigma_max: float | None = None, rho: float = 7, solver: str = "heun",
                     discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                     epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                     alpha: float = 1, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
                     S_noise: float = 1, callback: StepCallback | None = None) -> torch.Tensor:
    """Any combination of Table 1: ``solver`` 'heun' | 'euler', ``discretization`` (the time steps) 'vp' | 've' |
    'iddpm' | 'edm', ``schedule`` (the noise schedule sigma(t)) 'vp' | 've' | 'linear', ``scaling`` (s(t)) 'vp' |
    'none'; integrates Eq. 4 in t. The VP column is solver='euler', discretization='vp', schedule='vp',
    scaling='vp'; VE is euler/ve/ve/none; iDDPM+DDIM is euler/iddpm/linear/none; EDM is heun/edm/linear/none."""
    _check_choice("solver", solver, ("heun", "euler"))
    _check_choice("discretization", discretization, PAPER_TIME_STEPS)
    _check_choice("schedule", schedule, NOISE_SCHEDULES)
    _check_choice("scaling", scaling, SCALINGS)
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min, sigma_max = clip_to_network_range(net, default_min if sigma_min is None else sigma_min,
                                                 default_max if sigma_max is None else sigma_max)

    parameters = own_parameters(discretization, dict(epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M, rho=rho))
    sigmas = discretize(discretization, num_steps, sigma_min, sigma_max, latents.device, **parameters)
    # The VP schedule spans the same (clipped) range as the VP discretization.
    sigma_of_t = vp_schedule(*vp_betas_for_range(sigma_min, sigma_max, epsilon_s)) if schedule == "vp" else \
        NOISE_SCHEDULES[schedule]()
    flow = ProbabilityFlow(sigma_of_t, SCALINGS[scaling](sigma_of_t))
    t_steps = append_zero(flow.t_of_sigma(net, sigmas))

    step = euler_step if solver == "euler" else (lambda dx_dt, x, t, t_next: heun_step(dx_dt, x, t, t_next, alpha))
    return solve(net, latents, class_labels, t_steps, flow, step, Churn(S_churn, S_min, S_max, S_noise), randn_like,
                 callback)


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}='{value}': expected one of {', '.join(choices)}")
