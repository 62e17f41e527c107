"""Fast solvers of the probability-flow ODE: multistep and single-step methods that spend few denoiser calls.

The ODE is Eq. 4 of the EDM paper with sigma(t) = t, s(t) = 1, written in two variables:

- in sigma (the EDM parameterization): dx/dsigma = (x - D(x; sigma)) / sigma, the slope Euler and Heun use;
- in lambda = -log(sigma) (data prediction, Lu et al. 2022b "DPM-Solver++"): dx/dlambda = D(x; sigma) - x, whose
  exact solution over a step h = lambda_t - lambda_s is

      x_t = e^-h x_s + integral_{lambda_s}^{lambda_t} e^-(lambda_t - lambda) D(lambda) dlambda            (*)

  so that only D, a smooth function of lambda, needs approximating.

Every solver here is a function, and that function is the API::

    x0 = solver(denoise, x, sigmas, randn_like=torch.randn_like, callback=None, **its options)

over a black-box ``denoise(x, sigma)`` (float64; sigma a 0-dim float64 tensor), the state ``x`` at ``sigmas[0]``
(float64, e.g. unit noise times sigmas[0]) and the decreasing, positive noise levels ``sigmas`` (any of
``time_steps``) at which ``denoise`` is called; it returns x at sigma = 0. A multistep solver calls ``denoise``
exactly once per level, a two-stage one (DPM-Solver++(2S)) twice per step and once at the last level. The step from
the last level to sigma = 0 costs no call: ``final_denoised`` extrapolates D along the trajectory to sigma = 0 (D is
a smooth function of sigma^2 there). ``callback(i, sigma, x, denoised)``, if given, sees every step i: the level
sigma = sigmas[i], the state x at which D was evaluated there and D itself, so that a caller can watch or record
the trajectory; it changes nothing.

A network is a denoiser through ``lambda x, sigma: net(x, sigma, class_labels).to(torch.float64)``. The registry
(``registry.SAMPLERS``) wraps each solver in a ``Solver`` that knows how it spends a budget of network calls.

Weights of the multistep methods are integrals of Lagrange polynomials through the past nodes, computed for the
actual, non-uniform step sizes (Gauss-Legendre quadrature, exact to rounding for the step sizes used here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, sigma, x, denoised)

_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(32)
_GAUSS_NODES, _GAUSS_WEIGHTS = (_GAUSS_NODES + 1) / 2, _GAUSS_WEIGHTS / 2  # On [0, 1].

# ----------------------------------------------------------------------------
# Quadrature weights.


def lagrange_basis(nodes: Sequence[float], at: np.ndarray) -> np.ndarray:
    """l_j(at) for the Lagrange polynomials of ``nodes``: [len(nodes), len(at)]."""
    nodes = np.asarray(nodes, dtype=np.float64)
    basis = np.ones([len(nodes), len(at)])
    for j, node_j in enumerate(nodes):
        for m, node_m in enumerate(nodes):
            if m != j:
                basis[j] *= (at - node_m) / (node_j - node_m)
    return basis


def exponential_weights(lambdas: Sequence[float], lambda_s: float, lambda_t: float, rate: float = 1) -> list[float]:
    """w_j = integral_{lambda_s}^{lambda_t} rate e^(-rate (lambda_t - lambda)) l_j(lambda) dlambda, the weight of
    D(lambda_j) in (*) (rate 1) when D is the polynomial through the nodes ``lambdas``; rate = 1 + eta gives the
    deterministic part of the eta-SDE step (``exponential_multistep``). Nodes are scaled by h = lambda_t - lambda_s
    first, so the polynomials stay well conditioned for any step size."""
    h = lambda_t - lambda_s
    tau = np.asarray([(lam - lambda_s) / h for lam in lambdas])
    kernel = rate * h * np.exp(-rate * h * (1 - _GAUSS_NODES))
    return (lagrange_basis(tau, _GAUSS_NODES) @ (_GAUSS_WEIGHTS * kernel)).tolist()


def adams_weights(nodes: Sequence[float], t_s: float, t_t: float) -> list[float]:
    """w_j = integral_{t_s}^{t_t} l_j(t) dt: variable-step Adams weights of the slopes at ``nodes``."""
    h = t_t - t_s
    tau = np.asarray([(node - t_s) / h for node in nodes])
    return (h * lagrange_basis(tau, _GAUSS_NODES) @ _GAUSS_WEIGHTS).tolist()


def weighted_sum(weights: Sequence[float], values: Sequence[torch.Tensor]) -> torch.Tensor:
    total = weights[0] * values[0]
    for weight, value in zip(weights[1:], values[1:]):
        total = total + weight * value
    return total


def log_sigma(sigma: torch.Tensor | float) -> float:
    """lambda = -log(sigma), on the host."""
    return -math.log(float(sigma))


def report(callback: StepCallback | None, i: int, sigma: torch.Tensor, x: torch.Tensor,
           denoised: torch.Tensor) -> None:
    """Show step i to ``callback``, if there is one."""
    if callback is not None:
        callback(i, sigma, x, denoised)

# ----------------------------------------------------------------------------
# The last step, to sigma = 0.


def final_denoised(sigmas: Sequence[float], denoised: Sequence[torch.Tensor], points: int = 2) -> torch.Tensor:
    """x(0) from the last ``points`` evaluations D_j = D(x(sigma_j); sigma_j) along the trajectory.

    As sigma -> 0, x(sigma) -> x(0) and D(x(sigma); sigma) = x(sigma) + sigma^2 grad log p -> x(0), and along the
    trajectory both are smooth functions of sigma^2. The polynomial in sigma^2 through the last points, evaluated
    at 0, is then x(0) up to O(sigma^(2 points)); ``points`` = 1 is the usual x(0) = D(x; sigma_min). A node far
    above the last one gets a weight of order (sigma_last / sigma_j)^2, so the extrapolation never amplifies.
    """
    points = min(points, len(denoised))
    u = [float(s) ** 2 for s in sigmas[-points:]]
    weights = lagrange_basis(u, np.zeros(1))[:, 0].tolist()
    return weighted_sum(weights, denoised[-points:])

# ----------------------------------------------------------------------------
# Solvers in lambda = -log(sigma), data prediction.


def dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike = torch.randn_like,
             callback: StepCallback | None = None, final_points: int = 2) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): x_t = e^-h x_s + (1 - e^-h) ((1 + 1/(2r)) D_s - 1/(2r)
    D_{s-1}) with r = h_{s-1} / h; the first step is first order (DDIM)."""
    levels = sigmas.tolist()
    denoised = []
    for i, sigma in enumerate(levels):
        denoised.append(denoise(x, sigmas[i]))
        report(callback, i, sigmas[i], x, denoised[-1])
        if i == len(levels) - 1:
            break
        h = log_sigma(levels[i + 1]) - log_sigma(sigma)
        D = denoised[-1]
        if i > 0:
            r = (log_sigma(sigma) - log_sigma(levels[i - 1])) / h
            D = (1 + 1 / (2 * r)) * denoised[-1] - 1 / (2 * r) * denoised[-2]
        x = math.exp(-h) * x - math.expm1(-h) * D
    return final_denoised(levels, denoised, final_points)


def exponential_multistep(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
                          randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None,
                          order: int = 3, eta: float = 0, final_points: int = 2) -> torch.Tensor:
    """Exponential Adams-Bashforth in lambda (DPM-Solver++(kM), Lu et al. 2022b; DEIS's tAB, Zhang & Chen 2023):
    D in (*) is the polynomial through the last ``order`` evaluations, integrated exactly for the actual steps;
    the order ramps up from 1 while history accumulates.

    With eta > 0 it is the DPM-Solver++ SDE of the same order: x_t = e^(-(1 + eta) h) x_s + the same integral with
    kernel (1 + eta) e^(-(1 + eta)(lambda_t - lambda)) + sigma_t sqrt(1 - e^(-2 eta h)) z, which keeps the
    marginals for any eta (eta = 1: the reverse-time SDE; eta = 0: the ODE)."""
    levels = sigmas.tolist()
    lambdas = [log_sigma(s) for s in levels]
    denoised = []
    for i in range(len(levels)):
        denoised.append(denoise(x, sigmas[i]))
        report(callback, i, sigmas[i], x, denoised[-1])
        if i == len(levels) - 1:
            break
        k = min(order, len(denoised))
        h = lambdas[i + 1] - lambdas[i]
        weights = exponential_weights(lambdas[i + 1 - k:i + 1], lambdas[i], lambdas[i + 1], rate=1 + eta)
        x = math.exp(-(1 + eta) * h) * x + weighted_sum(weights, denoised[-k:])
        if eta > 0:
            x = x + levels[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(x)
    return final_denoised(levels, denoised, final_points)


def unipc_coefficients(r: Sequence[float], h: float, variant: str) -> list[float]:
    """a of UniPC (Zhao et al. 2023, Eq. 8 and Theorem 3.1) in data prediction: the update adds
    B(h) sum_m a_m (D(lambda_s + r_m h) - D_s) / r_m to the first-order step, with sum_m a_m r_m^(k-1) =
    k! h phi_{k+1}(h) / B(h), k = 1..p, where h phi_{k+1}(h) = integral_0^1 h e^(-h(1-tau)) tau^k / k! dtau.
    B(h) = h ('bh1') or 1 - e^-h ('bh2'); with one difference (p = 1) a_1 = 1/2, as the paper sets it."""
    if len(r) == 1:
        return [0.5]
    B = h if variant == "bh1" else -math.expm1(-h)
    kernel = h * np.exp(-h * (1 - _GAUSS_NODES)) * _GAUSS_WEIGHTS
    rhs = [float(kernel @ _GAUSS_NODES ** k) / B for k in range(1, len(r) + 1)]  # k! h phi_{k+1}(h) / B(h)
    R = np.array([[r_m ** (k - 1) for r_m in r] for k in range(1, len(r) + 1)])
    return np.linalg.solve(R, np.asarray(rhs)).tolist()


def _unipc_update(x_s: torch.Tensor, D_s: torch.Tensor, lambda_s: float, lambda_t: float,
                  others: Sequence[tuple[float, torch.Tensor]], variant: str) -> torch.Tensor:
    """e^-h x_s + (1 - e^-h) D_s + B(h) sum_m a_m D_m, D_m = (D(lambda_m) - D_s) / r_m, over ``others`` =
    [(lambda_m, D(lambda_m))]."""
    h = lambda_t - lambda_s
    x = math.exp(-h) * x_s - math.expm1(-h) * D_s
    if not others:
        return x
    r = [(lam - lambda_s) / h for lam, _ in others]
    a = unipc_coefficients(r, h, variant)
    B = h if variant == "bh1" else -math.expm1(-h)
    differences = [(D - D_s) / r_m for r_m, (_, D) in zip(r, others)]
    return x + B * weighted_sum(a, differences)


def unipc(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike = torch.randn_like,
          callback: StepCallback | None = None, predictor_order: int = 3, variant: str = "bh2",
          final_points: int = 2) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023, Algorithms 1-2), p = ``predictor_order``: the predictor UniP-p from the last p
    evaluations, then, once D is evaluated at the predicted point, the corrector UniC-p, which adds that evaluation
    and raises the order to p + 1. The next step starts from the corrected state but reuses the evaluation at the
    predicted one, so the corrector costs no call. No corrector after the last evaluation. The callback sees each
    predicted state with its evaluation."""
    levels = sigmas.tolist()
    lambdas = [log_sigma(s) for s in levels]
    denoised = [denoise(x, sigmas[0])]
    report(callback, 0, sigmas[0], x, denoised[0])
    for i in range(len(levels) - 1):
        k = min(predictor_order, len(denoised))
        history = list(zip(lambdas[i + 1 - k:i], denoised[-k:-1]))[::-1]
        x_pred = _unipc_update(x, denoised[-1], lambdas[i], lambdas[i + 1], history, variant)
        D_t = denoise(x_pred, sigmas[i + 1])
        report(callback, i + 1, sigmas[i + 1], x_pred, D_t)
        x = _unipc_update(x, denoised[-1], lambdas[i], lambdas[i + 1], history + [(lambdas[i + 1], D_t)], variant)
        denoised.append(D_t)
    return final_denoised(levels, denoised, final_points)


def dpmpp_2s(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike = torch.randn_like,
             callback: StepCallback | None = None, final_points: int = 2) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1) with the intermediate point at the middle of each step in
    lambda (r = 1/2): u = e^(-h/2) x_s + (1 - e^(-h/2)) D_s, x_t = e^-h x_s + (1 - e^-h) D(u; sigma_mid).
    Two calls per step, one at the last level; the callback sees the evaluations at the levels."""
    levels = sigmas.tolist()
    evaluated, denoised = [], []
    for i, sigma in enumerate(levels):
        D_s = denoise(x, sigmas[i])
        report(callback, i, sigmas[i], x, D_s)
        evaluated.append(sigma)
        denoised.append(D_s)
        if i == len(levels) - 1:
            break
        h = log_sigma(levels[i + 1]) - log_sigma(sigma)
        sigma_mid = math.sqrt(sigma * levels[i + 1])
        u = math.exp(-h / 2) * x - math.expm1(-h / 2) * D_s
        D_mid = denoise(u, torch.as_tensor(sigma_mid, dtype=torch.float64, device=x.device))
        evaluated.append(sigma_mid)
        denoised.append(D_mid)
        x = math.exp(-h) * x - math.expm1(-h) * D_mid
    return final_denoised(evaluated, denoised, final_points)

# ----------------------------------------------------------------------------
# Solvers in sigma (the EDM parameterization): slopes d = (x - D) / sigma.


def _slope(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, levels: list[float], i: int,
           callback: StepCallback | None) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma_i)) / sigma_i at step i (``levels``: the sigmas on the host), shown to
    ``callback``."""
    D = denoise(x, sigmas[i])
    report(callback, i, sigmas[i], x, D)
    return (x - D) / levels[i]


IPNDM_COEFFICIENTS = ([1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike = torch.randn_like,
          callback: StepCallback | None = None, order: int = 4) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, DEIS Appendix; from PNDM, Liu et al. 2022): explicit Adams-Bashforth with the
    fixed equal-step coefficients on the slopes d_i = (x_i - D_i) / sigma_i, x_{i+1} = x_i + (sigma_{i+1} -
    sigma_i) sum_k c_k d_{i-k}, the order ramping up 1, 2, 3, 4 over the first steps. The last step goes to
    sigma = 0 the same way. Its order is nominal on equal steps in sigma; on other steps see ``adams_sigma``."""
    levels = sigmas.tolist() + [0.0]
    slopes = []
    for i in range(len(levels) - 1):
        slopes.append(_slope(denoise, x, sigmas, levels, i, callback))
        coefficients = IPNDM_COEFFICIENTS[min(order, len(slopes)) - 1]
        x = x + (levels[i + 1] - levels[i]) * weighted_sum(coefficients, slopes[::-1])
    return x


def adams_sigma(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike = torch.randn_like,
                callback: StepCallback | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (LMS; variable-step Adams-Bashforth, the iPNDM of Zhou et al. 2024 with coefficients for
    the actual steps): x_{i+1} = x_i + sum_j w_j d_j, w_j = integral_{sigma_i}^{sigma_{i+1}} l_j(sigma) dsigma over
    the last ``order`` slopes d_j = (x_j - D_j) / sigma_j. The last step goes to sigma = 0 the same way."""
    levels = sigmas.tolist() + [0.0]
    slopes = []
    for i in range(len(levels) - 1):
        slopes.append(_slope(denoise, x, sigmas, levels, i, callback))
        k = min(order, len(slopes))
        x = x + weighted_sum(adams_weights(levels[i + 1 - k:i + 1], levels[i], levels[i + 1]), slopes[-k:])
    return x


def euler_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
                    randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None,
                    eta: float = 1) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020's posterior step, in the EDM parameterization): from sigma to sigma',
    sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) of fresh noise and a deterministic Euler step to
    sigma_down = sqrt(sigma'^2 - sigma_up^2); eta = 1 samples the exact posterior of a Gaussian, eta = 0 is DDIM.
    The last level goes to D(x; sigma_min)."""
    levels = sigmas.tolist()
    for i, sigma in enumerate(levels):
        D = denoise(x, sigmas[i])
        report(callback, i, sigmas[i], x, D)
        if i == len(levels) - 1:
            return D
        sigma_next = levels[i + 1]
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = D + sigma_down / sigma * (x - D)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x)
    return x


def multistep_consistency(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
                          randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None
                          ) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency model f = ``denoise``: the
    image f(x, sigma_0) from x = sigma_0 z, then, at each further level tau but the last, fresh noise brings it back
    to tau, x = f + sqrt(tau^2 - sigma_min^2) n, and f is applied again. ``sigmas[-1]`` is sigma_min, where f is
    the identity: it is never called there, so N levels cost N - 1 calls (1 call: one-step generation)."""
    levels = sigmas.tolist()
    sigma_min = levels[-1]
    D = denoise(x, sigmas[0])
    report(callback, 0, sigmas[0], x, D)
    for i in range(1, len(levels) - 1):
        x = D + math.sqrt(levels[i] ** 2 - sigma_min ** 2) * randn_like(D)
        D = denoise(x, sigmas[i])
        report(callback, i, sigmas[i], x, D)
    return D

# ----------------------------------------------------------------------------
# How a solver spends a budget of calls.


@dataclass(frozen=True)
class Solver:
    """A solver function (its options bound with ``functools.partial``) with what the registry needs: calls per
    step (1: multistep; 2: a two-stage step, with one call at the last level), the order to which its deterministic
    part converges (what tests/test_samplers.py measures) and whether it draws noise. Called as the function is.
    ``solves_ode`` False: not an ODE solver but a consistency model's sampler, with no call at the last level."""
    fn: Callable
    calls_per_step: int = 1
    convergence_order: int = 1
    stochastic: bool = False
    solves_ode: bool = True

    def levels_for(self, nfe: int) -> int:
        """The most noise levels whose sampling costs at most ``nfe`` calls."""
        if not self.solves_ode:
            return nfe + 1
        return nfe if self.calls_per_step == 1 else (nfe + 1) // 2

    def calls_for(self, num_levels: int) -> int:
        if not self.solves_ode:
            return num_levels - 1
        return num_levels if self.calls_per_step == 1 else 2 * num_levels - 1

    @property
    def min_nfe(self) -> int:
        return self.calls_for(2)

    def __call__(self, denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
                 randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None,
                 **options) -> torch.Tensor:
        return self.fn(denoise, x, sigmas, randn_like, callback=callback, **options)
