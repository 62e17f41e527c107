"""Which sampler runs, as one typed value: a ``SamplerSpec``, built once where the options come in (the command
line, a test, a user's script) and passed as it is to every place that samples: generation, fid.py, the EMA sweep,
the training loop's grids and metrics.

There are three kinds, one type each:

- ``PaperSampler``: the paper's sampler, ``paper.edm_sampler`` (Algorithm 1; Algorithm 2 with churn);
- ``AblationSampler``: any combination of Table 1, ``paper.ablation_sampler``;
- ``NamedSampler``: an entry of ``registry.SAMPLERS`` within a budget of network calls.

Each checks its values when it is built, with a one-line ValueError naming the option, and has ``run`` (latents to
float64 images) and ``describe`` (for messages). ``sampler_spec`` builds one from the flat options of generate.py,
by one rule: any of the named samplers' options (sampler, nfe, time_steps, sigmas) makes a ``NamedSampler``; else any option
only the ablation sampler has (solver, discretization, schedule, scaling, alpha, epsilon_s, C_1, C_2, M) an
``AblationSampler``; else a ``PaperSampler``. Options of both kinds together are refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Union

import torch

from training.sampling.noise_schedules import NOISE_SCHEDULES, SCALINGS
from training.sampling.paper import Churn, ablation_sampler, edm_sampler
from training.sampling.registry import get_sampler
from training.sampling.solvers import RandnLike, StepCallback
from training.sampling.time_steps import DEFAULT_NUM_STEPS, PAPER_TIME_STEPS, check_named_time_steps

NAMED_OPTIONS = ("sampler", "nfe", "time_steps", "sigmas")
ABLATION_OPTIONS = ("solver", "discretization", "schedule", "scaling", "alpha", "epsilon_s", "C_1", "C_2", "M")


def _check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: at least 2 time steps are needed")


def _check_range(sigma_min: float | None, sigma_max: float | None) -> None:
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value}: noise levels are positive")
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: expected sigma_min < sigma_max")


def _check_churn(churn: Churn) -> None:
    if churn.S_churn < 0 or churn.S_min < 0 or churn.S_max < 0:
        raise ValueError(f"S_churn={churn.S_churn}, S_min={churn.S_min}, S_max={churn.S_max}: must be non-negative")


def _check_steps_range_and_churn(spec) -> None:
    """The checks the paper's and the ablation sampler's specs share."""
    _check_num_steps(spec.num_steps)
    _check_range(spec.sigma_min, spec.sigma_max)
    _check_churn(spec.churn)


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}='{value}': expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class PaperSampler:
    """The paper's sampler (``edm_sampler``): Heun on the ``num_steps`` levels of Eq. 5 in [sigma_min, sigma_max]
    with ``rho``; with ``churn`` (S_churn > 0), Algorithm 2."""
    num_steps: int = DEFAULT_NUM_STEPS
    sigma_min: float = 0.002
    sigma_max: float = 80
    rho: float = 7
    churn: Churn = Churn()

    def __post_init__(self):
        _check_steps_range_and_churn(self)
        if not self.rho > 0:
            raise ValueError(f"rho={self.rho}: must be positive")

    def run(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
            randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample from ``latents`` (unit Gaussian noise [N, C, H, W]); float64 images."""
        return edm_sampler(net, latents, class_labels, randn_like, self.num_steps, self.sigma_min, self.sigma_max,
                           self.rho, **asdict(self.churn), callback=callback)

    def describe(self) -> str:
        return "edm_sampler"


@dataclass(frozen=True)
class AblationSampler:
    """A Table 1 combination (``ablation_sampler``): ``solver`` 'heun' | 'euler', ``time_steps`` (the
    discretization) 'vp' | 've' | 'iddpm' | 'edm', ``schedule`` sigma(t) 'vp' | 've' | 'linear', ``scaling`` s(t)
    'vp' | 'none'. ``sigma_min``/``sigma_max`` None: the discretization's own range."""
    num_steps: int = DEFAULT_NUM_STEPS
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7
    solver: str = "heun"
    time_steps: str = "edm"
    schedule: str = "linear"
    scaling: str = "none"
    epsilon_s: float = 1e-3
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    alpha: float = 1
    churn: Churn = Churn()

    def __post_init__(self):
        _check_steps_range_and_churn(self)
        _check_choice("solver", self.solver, ("heun", "euler"))
        _check_choice("discretization", self.time_steps, PAPER_TIME_STEPS)
        _check_choice("schedule", self.schedule, NOISE_SCHEDULES)
        _check_choice("scaling", self.scaling, SCALINGS)
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: Heun's intermediate point lies in (0, 1]")

    def run(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
            randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample from ``latents`` (unit Gaussian noise [N, C, H, W]); float64 images."""
        return ablation_sampler(net, latents, class_labels, randn_like, num_steps=self.num_steps,
                                sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho, solver=self.solver,
                                discretization=self.time_steps, schedule=self.schedule, scaling=self.scaling,
                                epsilon_s=self.epsilon_s, C_1=self.C_1, C_2=self.C_2, M=self.M, alpha=self.alpha,
                                **asdict(self.churn), callback=callback)

    def describe(self) -> str:
        return "ablation_sampler"


@dataclass(frozen=True)
class NamedSampler:
    """``SAMPLERS[name]`` with at most ``nfe`` network calls, on its ``time_steps`` (None: the sampler's own; else a
    name of ``NAMED_TIME_STEPS``, 'polyexponential:P', either with '+gaussian') in [sigma_min, sigma_max], or on the
    levels ``sigmas`` exactly as given (decreasing; for the consistency sampler the last is sigma_min, where it makes
    no call). ``churn``: Algorithm 2, for the paper's 'heun' and 'euler' only."""
    name: str = "heun"
    nfe: int = 2 * DEFAULT_NUM_STEPS - 1
    time_steps: str | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80
    rho: float = 7
    churn: Churn = Churn()
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self):
        sampler = get_sampler(self.name)
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
            self._check_sigmas()
        if int(self.nfe) != self.nfe or self.nfe < sampler.solver.min_nfe:
            raise ValueError(f"nfe={self.nfe}: '{self.name}' needs at least {sampler.solver.min_nfe} network calls")
        if self.sigmas is not None and sampler.solver.calls_for(len(self.sigmas)) > self.nfe:
            raise ValueError(f"nfe={self.nfe}: {len(self.sigmas)} levels cost '{self.name}' "
                             f"{sampler.solver.calls_for(len(self.sigmas))} network calls")
        if self.time_steps is not None:
            check_named_time_steps(self.time_steps)
        _check_range(self.sigma_min, self.sigma_max)
        _check_churn(self.churn)
        if not sampler.paper and self.churn != Churn(S_noise=self.churn.S_noise):
            raise ValueError(f"S_churn/S_min/S_max: churn (Algorithm 2) applies to the paper's samplers 'heun' and "
                             f"'euler', not to '{self.name}'")

    def _check_sigmas(self) -> None:
        levels = list(self.sigmas)
        if self.time_steps is not None:
            raise ValueError(f"sigmas with time_steps='{self.time_steps}': give the levels one way")
        if len(levels) < 2 or not all(a > b for a, b in zip(levels, levels[1:])) or levels[-1] <= 0:
            raise ValueError(f"sigmas={','.join(f'{s:g}' for s in levels)}: expected two or more positive, "
                             f"strictly decreasing levels")

    def run(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
            randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample from ``latents`` (unit Gaussian noise [N, C, H, W]); float64 images."""
        levels = self.time_steps if self.sigmas is None else torch.tensor(self.sigmas, dtype=torch.float64)
        return get_sampler(self.name)(net, latents, class_labels, randn_like, nfe=self.nfe, time_steps=levels,
                                      sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                                      **asdict(self.churn), callback=callback)

    def describe(self) -> str:
        if self.sigmas is not None:
            return f"{self.name} (NFE {self.nfe}, levels {','.join(f'{s:g}' for s in self.sigmas)})"
        time_steps = self.time_steps or get_sampler(self.name).time_steps
        return f"{self.name} (NFE {self.nfe}, {time_steps} steps)"


SamplerSpec = Union[PaperSampler, AblationSampler, NamedSampler]


def spec_record(spec: SamplerSpec) -> dict:
    """The spec as plain JSON-ready values: its kind (the type's name) and fields, infinities as 'inf'."""
    def plain(value):
        return "inf" if isinstance(value, float) and math.isinf(value) else value

    fields = {key: ({k: plain(v) for k, v in value.items()} if isinstance(value, dict) else plain(value))
              for key, value in asdict(spec).items()}
    return dict(kind=type(spec).__name__, **fields)


def sampler_spec(*, num_steps: int | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float | None = None, S_churn: float | None = None, S_min: float | None = None,
                 S_max: float | None = None, S_noise: float | None = None, sampler: str | None = None,
                 nfe: int | None = None, time_steps: str | None = None, solver: str | None = None,
                 discretization: str | None = None, schedule: str | None = None, scaling: str | None = None,
                 alpha: float | None = None, epsilon_s: float | None = None, C_1: float | None = None,
                 C_2: float | None = None, M: int | None = None,
                 sigmas: tuple[float, ...] | list[float] | None = None) -> SamplerSpec:
    """The sampler that generate.py's flat options name (the module docstring's rule); None means not given, and
    leaves the sampler's default. ``nfe`` of a named sampler defaults to 2 num_steps - 1, the cost of the paper's
    Heun with that many steps, or with ``sigmas`` the calls those levels cost."""
    given = {key: value for key, value in locals().items() if value is not None}
    named = [key for key in NAMED_OPTIONS if key in given]
    ablation = [key for key in ABLATION_OPTIONS if key in given]
    if named and ablation:
        raise ValueError(f"{', '.join(ablation)} with {', '.join(named)}: the Table 1 ablation sampler's options do "
                         f"not mix with a named sampler's")
    churn = Churn(**{key: given[key] for key in ("S_churn", "S_min", "S_max", "S_noise") if key in given})
    levels = {key: given[key] for key in ("sigma_min", "sigma_max", "rho") if key in given}
    if named:
        name = sampler or "heun"
        if sigmas is not None:
            sigmas = tuple(float(s) for s in sigmas)
            num_calls = nfe if nfe is not None else get_sampler(name).solver.calls_for(len(sigmas))
        else:
            num_calls = nfe if nfe is not None else 2 * (num_steps or DEFAULT_NUM_STEPS) - 1
        return NamedSampler(name=name, nfe=num_calls, time_steps=time_steps, churn=churn, sigmas=sigmas, **levels)
    steps = {} if num_steps is None else dict(num_steps=num_steps)
    if ablation:
        own = {key: given[key] for key in ("solver", "schedule", "scaling", "alpha", "epsilon_s", "C_1", "C_2", "M")
               if key in given}
        if discretization is not None:
            own["time_steps"] = discretization
        return AblationSampler(churn=churn, **steps, **levels, **own)
    return PaperSampler(churn=churn, **steps, **levels)
