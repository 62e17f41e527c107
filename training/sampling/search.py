"""Time steps optimized for one network and one solver, found once by a derivative-free search.

``search_sigma_steps`` finds the levels that minimize a solver's end-point error against a dense reference solve on
the search's own noise (in the spirit of "Align Your Steps", Sabour et al. 2024, and of the optimized-step searches of
Xue et al. 2024, "DMN"), over a smooth warp of log-uniform steps with a free last level (``WarpedSteps``).
``ScheduleCache`` keeps the results per network. What the error is, and which noise it is measured on, is the
registry's (``registry.Sampler.optimized_levels``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from training.sampling.time_steps import loguniform_sigma_steps


@dataclass(frozen=True)
class WarpedSteps:
    """Levels lambda_i = lambda_max + (lambda_end - lambda_max) W(i/(N-1)) with lambda = -log(sigma): W is the
    normalized integral of a density exp(theta(u)), theta piecewise linear over ``len(theta)`` equally spaced knots
    on [0, 1]; theta = 0 with sigma_end = sigma_min is log-uniform. Parameters: (theta_1..theta_K, log sigma_end);
    theta_0 = 0 fixes the density's scale.

    With ``free_first`` (an analytic first step, ``GaussianData.transport``), level 0 stays sigma_max and the
    warp spans the other N - 1 levels from a free sigma_1 (the switch to the solver, a last parameter) down."""
    num_steps: int
    sigma_min: float
    sigma_max: float
    num_knots: int = 8
    free_first: bool = False

    def sigmas(self, params: np.ndarray) -> torch.Tensor:
        num_theta = self.num_knots - 1
        theta = np.concatenate([[0.0], np.clip(params[:num_theta], -8, 8)])
        log_start = math.log(self.sigma_max)
        if self.free_first:
            log_start = float(np.clip(params[num_theta + 1], math.log(self.sigma_min) + 1, log_start - 0.05))
        log_end = float(np.clip(params[num_theta], math.log(self.sigma_min), log_start - 1))
        fine = np.linspace(0, 1, 4097)
        density = np.exp(np.interp(fine, np.linspace(0, 1, len(theta)), theta))
        cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
        warp = np.interp(np.linspace(0, 1, self.num_steps - self.free_first), fine, cumulative / cumulative[-1])
        log_sigma = log_start + warp * (log_end - log_start)
        if self.free_first:
            log_sigma = np.concatenate([[math.log(self.sigma_max)], log_sigma])
        return torch.as_tensor(np.exp(log_sigma), dtype=torch.float64)

    def initial(self) -> np.ndarray:
        """Log-uniform levels (with ``free_first``: the first step one log-uniform step long)."""
        first = [math.log(float(loguniform_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max)[1]))]
        return np.concatenate([np.zeros(self.num_knots - 1), [math.log(self.sigma_min)], first * self.free_first])


def search_sigma_steps(error: Callable[[torch.Tensor], float], num_steps: int, sigma_min: float, sigma_max: float,
                       starts: list[torch.Tensor] = (), max_evals: int = 300, num_knots: int = 8,
                       free_first: bool = False) -> torch.Tensor:
    """The ``num_steps`` levels from ``sigma_max`` down to at least ``sigma_min`` that minimize ``error(sigmas)``
    (an end-point error of one solver on the search's noise), by Nelder-Mead over ``WarpedSteps``' parameters,
    started from log-uniform steps and from the best of ``starts`` (fitted to the warp); ``free_first``: the
    second level too is free (the end of an analytic first step). Returns float64 levels, sigmas[0] = sigma_max
    exactly."""
    from scipy.optimize import minimize

    warp = WarpedSteps(num_steps, sigma_min, sigma_max, num_knots, free_first)
    best: dict = {}

    def objective(params: np.ndarray) -> float:
        sigmas = warp.sigmas(params)
        value = error(sigmas)
        value = math.log(value) if value > 0 and math.isfinite(value) else 1e3
        if value < best.get("value", math.inf):
            best.update(value=value, sigmas=sigmas)
        return value

    candidates = [warp.initial()] + [_fit_warp(warp, s) for s in starts]
    start = min(candidates, key=objective)
    dim = len(start)
    simplex = np.stack([start] + [start + 0.5 * np.eye(dim)[k] for k in range(dim)])
    minimize(objective, start, method="Nelder-Mead",
             options=dict(maxfev=max_evals, initial_simplex=simplex, xatol=1e-3, fatol=1e-4))
    sigmas = best["sigmas"].clone()
    sigmas[0] = sigma_max
    return sigmas


def _fit_warp(warp: WarpedSteps, sigmas: torch.Tensor) -> np.ndarray:
    """Warp parameters whose levels approximate ``sigmas``: theta from the log of the step density in lambda."""
    sigmas = sigmas[1:] if warp.free_first else sigmas
    lam = -np.log(sigmas.double().cpu().numpy())
    steps = np.diff(lam)
    u_mid = (np.arange(len(steps)) + 0.5) / len(steps) if len(steps) > 1 else np.zeros(1)
    theta = np.interp(np.linspace(0, 1, warp.num_knots), u_mid, -np.log(np.maximum(steps, 1e-12)))
    ends = [math.log(max(float(sigmas[-1]), warp.sigma_min))] + ([math.log(float(sigmas[0]))] if warp.free_first
                                                                  else [])
    return np.concatenate([theta[1:] - theta[0], ends])


class ScheduleCache:
    """Optimized schedules per network: a weak reference to the network object, then a key of the options
    (sampler, number of levels, range). A network that cannot be weakly referenced gets no cache."""

    def __init__(self):
        self._by_net = weakref.WeakKeyDictionary()

    def get(self, net, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        try:
            table = self._by_net.setdefault(net, {})
        except TypeError:
            return compute()
        if key not in table:
            table[key] = compute()
        return table[key]

    def clear(self) -> None:
        self._by_net = weakref.WeakKeyDictionary()
