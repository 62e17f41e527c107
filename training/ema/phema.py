"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, Section 3 and Appendix C).

A power-function EMA averages the training trajectory theta(tau) with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t

whose width is given relative to its length t: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
Training keeps one such EMA per sigma_rel (``PowerFunctionEMA``) and saves them now and then; afterwards, any
other sigma_rel at any saved time is approximated by a weighted sum of the saved snapshots, the weights solving
a least-squares fit of the profiles (``solve_posthoc_coefficients``; the snapshots are combined by
``training.ema.reconstruct``).

Time is counted in images throughout (``nimg``), as the training loop counts it; the fit depends only on
ratios of times, so the unit drops out.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch

from torch_utils import persistence
from torch_utils.misc import clone_module

# sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at gamma + 1 = (sqrt(5) - 1) / 2, then falls back to
# 0 as gamma -> infinity; a profile of sigma_rel above the peak does not exist. Below it, two gammas give the
# same sigma_rel; the EMA is the larger one (the averaging branch, which weights recent steps more).
GAMMA_AT_PEAK = (math.sqrt(5) - 1) / 2 - 1


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """sigma_rel of the profile p_{t,gamma}: its standard deviation over its length t (Appendix C, Eq. 123)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    sigma_rel = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    return sigma_rel.item() if sigma_rel.ndim == 0 else sigma_rel


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_PEAK)  # 0.3003


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """The exponent gamma of a power-function EMA of relative width sigma_rel, 0 < sigma_rel <= 0.3003 (Eq. 126,
    Algorithm 2). Squaring Eq. 123 and clearing its denominator gives the cubic
    sigma_rel^2 (gamma^3 + 7 gamma^2 + 16 gamma + 12) - (gamma + 1) = 0; gamma is its largest real root."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all((sigma_rel > 0) & (sigma_rel <= SIGMA_REL_MAX)):
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}]; got {sigma_rel.tolist()}")
    gammas = []
    for s2 in sigma_rel.reshape(-1) ** 2:
        roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
        gammas.append(max(GAMMA_AT_PEAK, roots.real[np.abs(roots.imag) <= 1e-9 * np.abs(roots)].max()))
    gamma = np.array(gammas).reshape(sigma_rel.shape)
    return gamma.item() if gamma.ndim == 0 else gamma


# The names the official EDM2 code gives these two functions.
std_to_exp, exp_to_std = sigma_rel_to_gamma, gamma_to_sigma_rel


def power_function_beta(sigma_rel: float, t_next: float, t_delta: float) -> float:
    """EMA decay beta for advancing the EMA of width sigma_rel from time t_next - t_delta to t_next (Eq. 127).

    Discretising the profile at steps of length t_delta gives beta = (1 - 1/t)^(gamma + 1) with t counted in steps,
    i.e. (1 - t_delta / t_next)^(gamma + 1) in any unit; on the first step (t_next = t_delta) beta = 0 and the
    EMA starts at the network's weights."""
    return (1 - t_delta / t_next) ** (sigma_rel_to_gamma(sigma_rel) + 1)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over tau of the product of the two profiles (Eq. 151),
    elementwise over broadcast arrays. In closed form, with t = min(t_a, t_b):

        (gamma_a + 1) (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t/t_a)^(gamma_a+1) (t/t_b)^(gamma_b+1) / t

    written with ratios of times, as tau^gamma itself overflows float64 for large gamma and t."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t = np.minimum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (t / t_a) ** (gamma_a + 1) * (t / t_b) ** (gamma_b + 1) / t)


def solve_posthoc_coefficients(in_nimg: Sequence[float], in_std: Sequence[float], out_nimg: float | Sequence[float],
                               out_std: Sequence[float]) -> np.ndarray:
    """Weights of the stored snapshots (profiles at ``in_nimg`` with widths ``in_std``) that best approximate
    each requested profile (``out_nimg``, ``out_std``; one time for all or one per output) in L2 (Algorithm 3):
    the normal equations A x = b with A = <p_i, p_j> and b = <p_i, p_out>. Returns [inputs, outputs], float64.

    Each column is then scaled to sum to 1. The exact least-squares weights sum to 1 only approximately; the
    profiles all integrate to 1, so a sum of 1 keeps the averaged weights at their scale."""
    in_nimg, in_gamma = np.asarray(in_nimg, dtype=np.float64), sigma_rel_to_gamma(np.asarray(in_std, dtype=np.float64))
    out_gamma = sigma_rel_to_gamma(np.asarray(out_std, dtype=np.float64)).reshape(-1)
    out_nimg = np.broadcast_to(np.asarray(out_nimg, dtype=np.float64), out_gamma.shape)
    if in_nimg.ndim != 1 or in_nimg.shape != np.shape(in_gamma) or len(in_nimg) == 0:
        raise ValueError("in_nimg and in_std must be two lists of the same, nonzero length")
    if np.any(in_nimg <= 0) or np.any(out_nimg <= 0):
        raise ValueError("snapshot times must be positive image counts")
    gram = profile_inner_product(in_nimg[:, None], in_gamma[:, None], in_nimg[None, :], in_gamma[None, :])
    target = profile_inner_product(in_nimg[:, None], in_gamma[:, None], out_nimg[None, :], out_gamma[None, :])
    weights = np.linalg.solve(gram, target)
    return weights / weights.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """One power-function EMA of ``net`` per sigma_rel in ``stds`` (Section 3.1). Call ``update`` after each
    optimizer step with the image count the step reached; ``emas`` maps sigma_rel to its EMA network."""

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        self.net = net
        self.stds = tuple(float(std) for std in stds)
        for std in self.stds:
            sigma_rel_to_gamma(std)  # Refuses a sigma_rel that no profile has.
        self._emas = [_copy_module(net).eval().requires_grad_(False) for _ in self.stds]

    @property
    def emas(self) -> dict[float, torch.nn.Module]:
        return dict(zip(self.stds, self._emas))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Advance every EMA over the step that took training from ``cur_nimg - batch_size`` to ``cur_nimg``
        images: theta_ema <- beta theta_ema + (1 - beta) theta. Buffers are copied."""
        net_params = [p.detach() for p in self.net.parameters()]
        net_buffers = list(self.net.buffers())
        for std, ema in zip(self.stds, self._emas):
            beta = power_function_beta(std, t_next=cur_nimg, t_delta=batch_size)
            torch._foreach_lerp_(list(ema.parameters()), net_params, 1 - beta)
            for ema_buffer, net_buffer in zip(ema.buffers(), net_buffers):
                ema_buffer.copy_(net_buffer)

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self._emas])

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["stds"]] != list(self.stds):
            raise ValueError(f"EMA state tracks sigma_rel {list(state['stds'])}, this run {list(self.stds)}")
        for ema, ema_state in zip(self._emas, state["emas"]):
            ema.load_state_dict(ema_state)


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    return clone_module(module) if persistence.is_persistent(module) else copy.deepcopy(module)
