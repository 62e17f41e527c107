"""Samplers by name: ``SAMPLERS`` maps each name to a ``Sampler``, a solver (``solvers``) on time steps
(``time_steps``), within a budget of network calls.

Each is called like ``paper.edm_sampler`` plus ``nfe`` (at most that many calls of ``net``, each on the whole batch)
and ``time_steps`` (a name of ``NAMED_TIME_STEPS``, optionally '+gaussian', or a tensor of levels); latents are
scaled by the first level, sigma_max, and the result is x at sigma = 0. 'heun' and 'euler' are the paper's own
samplers (Algorithm 1, with Algorithm 2's churn).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from training.sampling import paper, solvers
from training.sampling.gaussian import GaussianData, fit_gaussian
from training.sampling.paper import Churn, clip_to_network_range, round_sigma
from training.sampling.search import ScheduleCache, search_sigma_steps
from training.sampling.seeds import SeedRNG, draw_class_labels, draw_latents
from training.sampling.solvers import RandnLike, Solver, StepCallback
from training.sampling.time_steps import (DEFAULT_NUM_STEPS, GAUSSIAN_SUFFIX, loguniform_sigma_steps, sigma_steps,
                                          split_time_steps)

SEARCH_SEED, SEARCH_BATCH, SEARCH_REFERENCE_LEVELS, SEARCH_MAX_EVALS = 2024, 32, 512, 300
# '+gaussian' search starts: the switch to the solver at sigma_max (sigma_min / sigma_max)^f for each f.
SEARCH_SWITCHES = (0.1, 0.15, 0.2, 0.25, 0.3)
GAUSSIAN_SEED = 4048  # The Gaussian fit's probes: seeds GAUSSIAN_SEED.., 2 (dim + 1) of them.
OPTIMIZED_SCHEDULES = ScheduleCache()



@dataclass(frozen=True)
class Sampler:
    """``solver`` on the levels of ``time_steps`` (its default). ``paper``: the paper's Heun or Euler
    (``paper.heun``, ``paper.euler``), which take Algorithm 2's churn: 'heun' on the 'edm' schedule with
    nfe = 2N - 1 is ``edm_sampler`` with num_steps = N, bit for bit.

    'NAME+gaussian' schedules take an analytic first step: N + 1 levels of NAME (the switch level sigma_1 searched
    with the rest for 'optimized+gaussian'), the step from sigma_0 = sigma_max to sigma_1 the closed-form ODE
    solution of the Gaussian with the data's mean and covariance (``GaussianData``, fitted once per network
    on its own noise by ``gaussian_model``, its calls not counted), the solver from sigma_1 on with the N calls."""
    solver: Solver
    time_steps: str = "edm"
    paper: bool = False

    def __call__(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                 randn_like: RandnLike = torch.randn_like, nfe: int = 2 * DEFAULT_NUM_STEPS - 1,
                 time_steps: str | torch.Tensor | None = None, sigma_min: float = 0.002, sigma_max: float = 80,
                 rho: float = 7, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
                 S_noise: float = 1, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample with at most ``nfe`` calls of ``net``. ``time_steps``: a name of ``NAMED_TIME_STEPS``, with
        '+gaussian' or not, or a decreasing tensor of levels (its length decides the calls). Returns float64
        images [N, C, H, W]. ``callback(i, sigma, x, denoised)`` sees every step (``solvers``)."""
        name = self.name
        churn = Churn(S_churn, S_min, S_max, S_noise)
        if not self.paper and churn != Churn(S_noise=S_noise):
            raise ValueError(f"S_churn/S_min/S_max: churn (Algorithm 2) applies to the paper's samplers 'heun' and "
                             f"'euler', not to '{name}'")
        sigmas, gaussian = self.levels(net, latents, nfe, time_steps, sigma_min, sigma_max, rho)
        return self.sample(net, latents, class_labels, sigmas, gaussian, randn_like, callback, churn)

    def sample(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None, sigmas: torch.Tensor,
               gaussian: bool = False, randn_like: RandnLike = torch.randn_like,
               callback: StepCallback | None = None, churn: Churn = Churn()) -> torch.Tensor:
        """The solver on ``sigmas`` from x = latents sigmas[0]; with ``gaussian``, x first goes from sigmas[0]
        to sigmas[1] analytically (``gaussian_model``) and the network is called from sigmas[1] on. The paper's
        samplers get ``churn`` (Algorithm 2) and the network's ``round_sigma``."""
        def denoise(x, sigma):
            return net(x, sigma, class_labels).to(torch.float64)

        x = latents.to(torch.float64) * sigmas[0]
        if gaussian:
            model = self.gaussian_model(net, float(sigmas[0]), latents.device)
            x, sigmas = model.transport(x, float(sigmas[0]), float(sigmas[1])), sigmas[1:]
        if self.paper:
            return self.solver(denoise, x, sigmas, randn_like, callback, churn=churn,
                               round_sigma=getattr(net, "round_sigma", None))
        return self.solver(denoise, x, sigmas, randn_like, callback)

    @property
    def name(self) -> str:
        return next((name for name, sampler in SAMPLERS.items() if sampler is self), "sampler")

    def levels(self, net, latents: torch.Tensor, nfe: int, time_steps: str | torch.Tensor | None,
               sigma_min: float, sigma_max: float, rho: float) -> tuple[torch.Tensor, bool]:
        """(the noise levels, analytic first step?): levels snapped to the network's ``round_sigma``, float64 on
        the latents' device; checks that they cost at most ``nfe`` calls (the first step's none if analytic). Runs
        the one-time work, cached per network: the 'optimized' search, the Gaussian fit of '+gaussian'."""
        time_steps = self.time_steps if time_steps is None else time_steps
        gaussian = False
        if isinstance(time_steps, torch.Tensor):
            sigmas = time_steps.to(torch.float64)
        else:
            time_steps, gaussian = split_time_steps(time_steps)
            if gaussian and not self.solver.solves_ode:
                raise ValueError(f"time_steps='{time_steps}{GAUSSIAN_SUFFIX}': the analytic first step is an "
                                 f"ODE step; '{self.name}' samples a consistency model")
            if gaussian and self.paper:
                raise ValueError(f"time_steps='{time_steps}{GAUSSIAN_SUFFIX}': the paper's samplers "
                                 f"'heun' and 'euler' stay as they are; '{self.name}' takes no analytic first step")
            if nfe < self.solver.min_nfe:
                raise ValueError(f"nfe={nfe}: '{self.name}' needs at least {self.solver.min_nfe} network calls")
            sigma_min, sigma_max = clip_to_network_range(net, sigma_min, sigma_max)
            num_levels = self.solver.levels_for(nfe) + gaussian
            if time_steps == "optimized":
                sigmas = self.optimized_levels(net, num_levels, sigma_min, sigma_max, rho, gaussian)
            else:
                sigmas = sigma_steps(time_steps, num_levels, sigma_min, sigma_max, rho)
        sigmas = round_sigma(net, sigmas.to(latents.device))
        if len(sigmas) < 2 + gaussian or not bool(torch.all(sigmas[1:] < sigmas[:-1])) or float(sigmas[-1]) <= 0:
            raise ValueError(f"time_steps: the noise levels must be positive and strictly decreasing "
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
            raise ValueError(f"time_steps='optimized': '{self.name}' draws noise; the search fits deterministic "
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
                                          time_steps=reference_levels))

        def error(sigmas: torch.Tensor) -> float:
            x = self.sample(net, latents, labels, round_sigma(net, sigmas.to(latents.device)), gaussian)
            return float((x - reference).square().mean().sqrt())

        shapes = ("edm", "polyexponential") + (("loguniform",) if gaussian else ())
        switches = [sigma_max * (sigma_min / sigma_max) ** f for f in SEARCH_SWITCHES] if gaussian else [sigma_max]
        starts = [torch.cat([torch.full([int(gaussian)], sigma_max, dtype=torch.float64),
                             sigma_steps(name, num_levels - gaussian, sigma_min, switch, rho)])
                  for name in shapes for switch in switches]
        return search_sigma_steps(error, num_levels, sigma_min, sigma_max, starts, max_evals=SEARCH_MAX_EVALS,
                                  free_first=gaussian)

    def gaussian_model(self, net, sigma: float, device: torch.device | str = "cpu") -> GaussianData:
        """The Gaussian whose ideal denoiser best matches ``net`` at ``sigma`` (``fit_gaussian``): ``net``
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
    def _fit_gaussian(net, sigma: float, device) -> GaussianData:
        dim = net.img_channels * net.img_resolution * net.img_resolution
        seeds = range(GAUSSIAN_SEED, GAUSSIAN_SEED + 2 * (dim + 1))
        probes, denoised = [], []
        for start in range(0, len(seeds), SEARCH_BATCH):
            x = draw_latents(net, SeedRNG(seeds[start:start + SEARCH_BATCH], device)).to(torch.float64) * sigma
            probes.append(x)
            denoised.append(net(x, torch.as_tensor(sigma, dtype=torch.float64, device=device), None).to(torch.float64))
        return fit_gaussian(torch.cat(probes), torch.cat(denoised), sigma)


SAMPLERS: dict[str, Sampler] = {
    # The paper's (Algorithm 1): Euler and Heun on Eq. 5's steps.
    "euler": Sampler(Solver(paper.euler, convergence_order=1), paper=True),
    "heun": Sampler(Solver(paper.heun, calls_per_step=2, convergence_order=2), paper=True),
    # Data prediction in lambda = -log(sigma): DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023).
    "dpmpp_2m": Sampler(Solver(solvers.dpmpp_2m, convergence_order=2)),
    "dpmpp_3m": Sampler(Solver(partial(solvers.exponential_multistep, order=3), convergence_order=3)),
    "dpmpp_4m": Sampler(Solver(partial(solvers.exponential_multistep, order=4), convergence_order=4)),
    "dpmpp_2s": Sampler(Solver(solvers.dpmpp_2s, calls_per_step=2, convergence_order=2)),
    # UniPC-3: the corrector raises its third-order predictor to the fourth order.
    "unipc_bh1": Sampler(Solver(partial(solvers.unipc, predictor_order=3, variant="bh1"), convergence_order=4)),
    "unipc_bh2": Sampler(Solver(partial(solvers.unipc, predictor_order=3, variant="bh2"), convergence_order=4)),
    # Adams-Bashforth on the EDM slopes (x - D) / sigma: iPNDM (Zhang & Chen 2023), LMS (variable steps).
    # iPNDM's order is 4 in the interior, but its first-order start limits the global order (docs/samplers.md).
    "ipndm": Sampler(Solver(solvers.ipndm, convergence_order=3)),
    "lms": Sampler(Solver(solvers.adams_sigma, convergence_order=4)),
    # Stochastic: ancestral Euler, and the DPM-Solver++ SDEs (eta = 1).
    "euler_ancestral": Sampler(Solver(solvers.euler_ancestral, convergence_order=1, stochastic=True)),
    "dpmpp_2m_sde": Sampler(Solver(partial(solvers.exponential_multistep, order=2, eta=1.0), convergence_order=2,
                                   stochastic=True)),
    "dpmpp_3m_sde": Sampler(Solver(partial(solvers.exponential_multistep, order=3, eta=1.0), convergence_order=3,
                                   stochastic=True)),
    # For consistency models (train.py --consistency): one call per level, fresh noise between them.
    "consistency": Sampler(Solver(solvers.multistep_consistency, convergence_order=0, stochastic=True,
                                  solves_ode=False)),
}


def get_sampler(name: str) -> Sampler:
    """``SAMPLERS[name]``, or a one-line error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler='{name}': expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
