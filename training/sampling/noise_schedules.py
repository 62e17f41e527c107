"""The noise schedule sigma(t) and the scaling s(t): Table 1's rows "Schedule" and "Scaling".

Together they fix the probability-flow ODE of Eq. 4 (``paper.ProbabilityFlow``). They are functions of the ODE's
time t; the noise levels at which a sampler stops are a separate choice, the time steps (``time_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from training.networks.precond import vp_sigma_inv


@dataclass(frozen=True)
class NoiseSchedule:
    """sigma(t), its derivative sigma'(t) and its inverse t(sigma)."""
    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable


@dataclass(frozen=True)
class Scaling:
    """s(t) and its derivative s'(t)."""
    s: Callable
    s_deriv: Callable


def vp_schedule(beta_d: float = 19.9, beta_min: float = 0.1) -> NoiseSchedule:
    """VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (``networks.precond.vp_sigma``) and its inverse
    (``networks.precond.vp_sigma_inv``)."""
    def sigma(t):
        # e ** x rather than precond's exp(x): the official sampler rounds so, and its time steps match to the bit.
        return (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5

    def sigma_deriv(t):
        return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

    return NoiseSchedule(sigma, sigma_deriv, partial(vp_sigma_inv, beta_d=beta_d, beta_min=beta_min))


def ve_schedule() -> NoiseSchedule:
    """VE: sigma(t) = sqrt(t)."""
    return NoiseSchedule(sigma=lambda t: t.sqrt(), sigma_deriv=lambda t: 0.5 / t.sqrt(),
                         sigma_inv=lambda sigma: sigma ** 2)


def linear_schedule() -> NoiseSchedule:
    """iDDPM and EDM: sigma(t) = t."""
    return NoiseSchedule(sigma=lambda t: t, sigma_deriv=lambda t: 1, sigma_inv=lambda sigma: sigma)


def vp_scaling(schedule: NoiseSchedule) -> Scaling:
    """VP: s(t) = 1 / sqrt(1 + sigma(t)^2), following whichever sigma(t) is chosen."""
    def s(t):
        return 1 / (1 + schedule.sigma(t) ** 2).sqrt()

    def s_deriv(t):
        return -schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3)

    return Scaling(s, s_deriv)


def no_scaling(schedule: NoiseSchedule | None = None) -> Scaling:
    """VE, iDDPM and EDM: s(t) = 1."""
    return Scaling(s=lambda t: 1, s_deriv=lambda t: 0)


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """beta_d, beta_min of the VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


NOISE_SCHEDULES = {"vp": vp_schedule, "ve": ve_schedule, "linear": linear_schedule}
SCALINGS = {"vp": vp_scaling, "none": no_scaling}
