"""Time steps: the N noise levels sigma_0 > ... > sigma_{N-1} at which a sampler evaluates the network (Table 1's
row "Time steps"; float64). The step from the last level to sigma = 0 is the solver's own.

Every discretization is an entry of one typed table, ``TIME_STEPS`` (``TimeSteps``: its builder ``(num_steps,
sigma_min, sigma_max, *its own parameters, device)``, the names of those parameters and, for Table 1's columns, its
default range), which every dispatcher reads; ``discretize(name, ...)`` builds one:

- the paper's: ``edm`` (Eq. 5, ``rho``), ``vp`` (``epsilon_s``), ``ve`` (geometric in sigma^2) and ``iddpm`` (the
  discrete levels of iDDPM, ``C_1``, ``C_2``, ``M``);
- beyond the paper: ``loguniform``, equal steps in lambda = -log(sigma), the variable of DPM-Solver (Lu et al. 2022a,
  'logSNR' steps), and ``polyexponential``, log(sigma) = log(sigma_min) + (1 - i/(N-1))^rho (log(sigma_max) -
  log(sigma_min)), denser near sigma_min for rho > 1 (rho = 1 is log-uniform).

The Table 1 ablation sampler chooses among the paper's (its ``discretization``); the named samplers of the registry
among ``NAMED_TIME_STEPS`` (their ``time_steps``: 'edm', 'loguniform', 'polyexponential[:P]', or 'optimized', the
levels searched for one network, ``search``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from training.networks.precond import iddpm_sigma_levels
from training.sampling.noise_schedules import vp_betas_for_range, vp_schedule

DEFAULT_NUM_STEPS = 18  # N of every sampler's default steps: the paper's CIFAR-10 choice (Heun, NFE 35).


def _ramp(num_steps: int, device) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1, in float64."""
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: at least 2 steps are needed")
    return torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = _ramp(num_steps, device)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def vp_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """VP: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma(t_i) with the VP schedule spanning the range."""
    t = 1 + _ramp(num_steps, device) * (epsilon_s - 1)
    return vp_schedule(*vp_betas_for_range(sigma_min, sigma_max, epsilon_s)).sigma(t)


def ve_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """VE: t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma_i = sqrt(t_i) (geometric)."""
    t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** _ramp(num_steps, device)
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
    """iDDPM's levels u_0 > ... > u_M = 0 (Table 1; ``networks.precond.iddpm_sigma_levels``) in float64, computed once
    per (M, C_1, C_2). Their ratios are float32, as in the official sampler; which levels survive the range filter
    depends on it."""
    return _iddpm_levels_float64(M, C_1, C_2).to(device=device, copy=True)


@functools.lru_cache(maxsize=8)
def _iddpm_levels_float64(M: int, C_1: float, C_2: float) -> torch.Tensor:
    return iddpm_sigma_levels(M, C_1, C_2, torch.float64)


def loguniform_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """sigma_i = sigma_max (sigma_min / sigma_max)^(i/(N-1)): equal steps in lambda = -log(sigma)."""
    return sigma_max * (sigma_min / sigma_max) ** _ramp(num_steps, device)


def polyexponential_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 2,
                                device: torch.device | str | None = None) -> torch.Tensor:
    """log(sigma_i) = log(sigma_min) + (1 - i/(N-1))^rho (log(sigma_max) - log(sigma_min))."""
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(log_min + (1 - _ramp(num_steps, device)) ** rho * (log_max - log_min))


def _vp_default_range(epsilon_s: float = 1e-3) -> tuple[float, float]:
    """The VP column's range: sigma(epsilon_s) .. sigma(1) of the VP schedule with beta_d = 19.9, beta_min = 0.1."""
    vp = vp_schedule(beta_d=19.9, beta_min=0.1)
    return float(vp.sigma(epsilon_s)), float(vp.sigma(1.0))


@dataclass(frozen=True)
class TimeSteps:
    """One way to place the levels: ``build(num_steps, sigma_min, sigma_max, **params, device=...)``, the names of its
    own ``params`` (with their defaults in ``build``), and, for Table 1's columns, the range it uses unless told
    otherwise (``default_range(**params)``, before clipping to the network's range)."""
    name: str
    build: Callable[..., torch.Tensor]
    params: tuple[str, ...] = ()
    default_range: Callable[..., tuple[float, float]] | None = None

    @property
    def in_table_1(self) -> bool:
        return self.default_range is not None


TIME_STEPS = {entry.name: entry for entry in (
    TimeSteps("vp", vp_sigma_steps, ("epsilon_s",), _vp_default_range),
    TimeSteps("ve", ve_sigma_steps, (), lambda: (0.02, 100.0)),
    TimeSteps("iddpm", iddpm_sigma_steps, ("C_1", "C_2", "M"), lambda: (0.002, 81.0)),
    TimeSteps("edm", edm_sigma_steps, ("rho",), lambda: (0.002, 80.0)),
    TimeSteps("loguniform", loguniform_sigma_steps),
    TimeSteps("polyexponential", polyexponential_sigma_steps, ("rho",)),
)}
PAPER_TIME_STEPS = tuple(name for name, entry in TIME_STEPS.items() if entry.in_table_1)  # The ablation sampler's.


def time_steps_entry(name: str) -> TimeSteps:
    """``TIME_STEPS[name]``, or a one-line error listing the names."""
    if name not in TIME_STEPS:
        raise ValueError(f"time steps '{name}': expected one of {', '.join(TIME_STEPS)}")
    return TIME_STEPS[name]


def discretize(name: str, num_steps: int, sigma_min: float, sigma_max: float,
               device: torch.device | str | None = None, **params) -> torch.Tensor:
    """The levels of ``TIME_STEPS[name]`` with that discretization's own ``params`` (edm: rho; vp: epsilon_s;
    iddpm: C_1, C_2, M; polyexponential: rho, its exponent)."""
    entry = time_steps_entry(name)
    unknown = set(params) - set(entry.params)
    if unknown:
        raise ValueError(f"time steps '{name}': takes {', '.join(entry.params) or 'no parameters'}, not "
                         f"{', '.join(sorted(unknown))}")
    return entry.build(num_steps, sigma_min, sigma_max, device=device, **params)


def own_parameters(name: str, available: dict) -> dict:
    """Of ``available`` (e.g. every parameter the ablation sampler takes), the ones the time steps ``name`` use."""
    return {key: available[key] for key in time_steps_entry(name).params if key in available}


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """The noise level range each of the paper's discretizations uses unless told otherwise (before clipping to the
    network's range)."""
    entry = time_steps_entry(discretization)
    if not entry.in_table_1:
        raise ValueError(f"time steps '{discretization}': not one of Table 1's ({', '.join(PAPER_TIME_STEPS)})")
    return entry.default_range(**own_parameters(discretization, dict(epsilon_s=epsilon_s)))

# ----------------------------------------------------------------------------
# The named samplers' time steps: NAMED_TIME_STEPS by name, with an optional analytic first step.

NAMED_TIME_STEPS = ("edm", "loguniform", "polyexponential", "optimized")
GAUSSIAN_SUFFIX = "+gaussian"  # 'NAME+gaussian': the first step is analytic (``registry.Sampler.gaussian_model``).


def split_time_steps(time_steps: str) -> tuple[str, bool]:
    """('NAME', analytic first step?) of 'NAME' or 'NAME+gaussian'."""
    if time_steps.endswith(GAUSSIAN_SUFFIX):
        return time_steps[:-len(GAUSSIAN_SUFFIX)], True
    return time_steps, False


def check_named_time_steps(time_steps: str) -> None:
    """A one-line ValueError unless ``time_steps`` names levels a named sampler can take: a name of
    ``NAMED_TIME_STEPS`` or 'polyexponential:P' (P > 0), either with '+gaussian' or not."""
    name = split_time_steps(time_steps)[0]
    if name == "optimized":
        return
    try:
        sigma_steps(name, 3, 0.002, 80)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"time_steps='{time_steps}': expected one of {', '.join(NAMED_TIME_STEPS)} (polyexponential:P "
                         f"for an exponent P > 0; NAME+gaussian for an analytic first step)") from None


def sigma_steps(time_steps: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The named time steps' levels: 'edm' (Eq. 5 with ``rho``), 'loguniform', 'polyexponential' (exponent
    2) or 'polyexponential:P' (exponent P). 'optimized' depends on a network: see ``registry.Sampler``."""
    name, _, argument = time_steps.partition(":")
    if name not in NAMED_TIME_STEPS or name == "optimized":
        raise ValueError(f"time_steps='{time_steps}': expected one of {', '.join(NAMED_TIME_STEPS)}")
    if argument and name != "polyexponential":
        raise ValueError(f"time_steps='{time_steps}': only polyexponential takes a value (polyexponential:P)")
    exponent = float(argument or 2) if name == "polyexponential" else rho  # Both builders call it rho.
    if not exponent > 0:
        raise ValueError(f"time_steps='{time_steps}': the exponent must be positive")
    return discretize(name, num_steps, sigma_min, sigma_max, device, **own_parameters(name, dict(rho=exponent)))
