"""Training losses of the paper (Section 5, Table 2): one denoising loss, three choices of
p_train(sigma) and lambda(sigma).

    loss = lambda(sigma) * || D(y + n; sigma) - y ||^2,   n ~ N(0, sigma^2 I),  sigma ~ p_train

returned per pixel (the training loop sums it and divides by the batch size). With an augmentation pipe,
y is the augmented image and the pipe's labels reach the network as ``augment_labels``.
"""

from __future__ import annotations

import contextlib

import torch

from torch_utils import persistence
from training.networks.precond import vp_sigma


class DenoisingLoss:
    """Eq. 2 weighted by lambda(sigma), with sigma drawn from p_train. Subclasses define both."""

    def sample_sigma(self, shape, device: torch.device) -> torch.Tensor:
        """Draw sigma ~ p_train, shaped ``shape`` (one per image: [N, 1, 1, 1])."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma)."""
        raise NotImplementedError

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma([images.shape[0], 1, 1, 1], images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * ((D_yn - y) ** 2)


@persistence.persistent_class
class VPLoss(DenoisingLoss):
    """Table 1 'VP': sigma = sigma_VP(t), t ~ U(epsilon_t, 1); lambda = 1/sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sample_sigma(self, shape, device):
        t = 1 + torch.rand(shape, device=device) * (self.epsilon_t - 1)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class VELoss(DenoisingLoss):
    """Table 1 'VE': ln(sigma) ~ U(ln sigma_min, ln sigma_max); lambda = 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, shape, device):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(shape, device=device)

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class EDMLoss(DenoisingLoss):
    """Table 1 'EDM': ln(sigma) ~ N(P_mean, P_std^2); lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which is 1 / c_out^2, so the loss seen by F has unit weight at every sigma (Eq. 8)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, shape, device):
        return (torch.randn(shape, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


@persistence.persistent_class
class EDM2Loss(EDMLoss):
    """EDM2 (Karras et al., CVPR 2024, Eq. 21): EDM's p_train and lambda(sigma) (defaults P_mean = -0.4,
    P_std = 1.0), with the per-image loss weighted by a learned uncertainty u(sigma) that the network returns as
    ``logvar``:

        loss = lambda(sigma) / exp(u(sigma)) * ||D(y + n; sigma) - y||^2 + u(sigma),

    per pixel (u broadcast), so the network's own estimate of its error evens out the loss over sigma."""

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma([images.shape[0], 1, 1, 1], images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        # The EDM2 networks take no augmentation labels; they are passed only when there are some.
        extra = {} if augment_labels is None else dict(augment_labels=augment_labels)
        D_yn, logvar = net(y + n, sigma, labels, return_logvar=True, **extra)
        return self.weight(sigma) / logvar.exp() * ((D_yn - y) ** 2) + logvar


# ----------------------------------------------------------------------------
# Consistency tuning: Easy Consistency Tuning (ECT; Geng et al. 2024, "Consistency Models Made Easy"), which turns a
# trained denoiser D into a consistency model f(x, t) = D(x; t) (Song et al. 2023). The preconditioning holds the
# boundary condition f(x, 0) = x: every Table 1 column has c_skip(0) = 1 and c_out(0) = 0.


def ect_r(t: torch.Tensor, stage: int, q: float = 2, k: float = 8, b: float = 1) -> torch.Tensor:
    """ECT's mapping from t to the nearer level r < t (its Eq. 12 with the sigmoid n(t)):

        r = t (1 - n(t) / q^(stage + 1)),  n(t) = 1 + k sigmoid(-b t),  clamped at 0,

    so the gap t - r = t n(t) / q^(stage + 1) halves (q = 2) with every stage: at stage 0 most r are 0 (a
    denoising loss, where the tuning starts from), later r approaches t (the consistency condition)."""
    n = 1 + k * torch.sigmoid(-b * t)
    return (t * (1 - n / q ** (stage + 1))).clamp(min=0)


@contextlib.contextmanager
def weights_left_as_they_are(net):
    """Calls of ``net`` that leave its stored weights untouched: EDM2's layers skip their forced weight normalization
    (``force_weight_norm``), which rescales the weights in place at every call in training. For a call that updates
    no weight, such as the consistency target: the target then sees the weights the student saw, and every process
    rescales as often as the others whether or not it evaluates a target, so the replicas stay equal."""
    layers = [m for m in (net.modules() if hasattr(net, "modules") else ()) if hasattr(m, "force_weight_norm")]
    for layer in layers:
        layer.force_weight_norm = False
    try:
        yield
    finally:
        for layer in layers:
            del layer.force_weight_norm  # Back to the class's True.


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """Per image: sqrt(||difference||^2 + c^2) - c (Song & Dhariwal 2023's pseudo-Huber distance); c = 0 is the
    L2 norm ||difference||, which is ECT's adaptive weighting of the squared distance with p = 1/2."""
    squared = difference.to(torch.float32).square().flatten(1).sum(1)
    # The floor keeps the gradient of a zero difference at 0 for c = 0 (sqrt's slope there is infinite).
    return (squared + c ** 2).clamp(min=torch.finfo(torch.float32).tiny).sqrt() - c


@persistence.persistent_class
class ConsistencyLoss:
    """ECT's consistency loss (Geng et al. 2024, Eq. 9 with its Eq. 12 mapping):

        loss = w(t, r) d(f(y + t n, t), stopgrad f(y + r n, r)),   ln t ~ N(P_mean, P_std^2),   r = ect_r(t),

    the same noise n on both sides (and the same dropout masks), d the pseudo-Huber distance with ``c``, and
    f(y + 0 n, 0) = y where r = 0. ``weighting``: 'ect', w = 1 / (t - r) (ECT's CIFAR-10 loss), or 'edm', w = (t^2 +
    sigma_data^2) / (t sigma_data)^2 (EDM's lambda(t), ECT's EDM2 loss). The stage counts the images seen: stage =
    images // ``stage_nimg`` (the training loop calls ``set_progress``), so a resumed run continues on the same
    schedule. ``sample_sigmas``: the levels at which the training loop's grids and metrics sample the model (None:
    2 calls of the consistency sampler on Eq. 5's levels). Returned per image [N, 1, 1, 1].

    With a ``teacher`` (a denoiser, possibly guided: ``training.sampling.guided``; attached by the training loop and
    never pickled), it is consistency distillation (Song et al. 2023, CD): the point at r is not y + r n but one step
    of the teacher's probability-flow ODE (Eq. 4 with sigma(t) = t, s(t) = 1) from x_t = y + t n to r,
    ``teacher_step`` ('heun': Heun's step, the last to r = 0 Euler's; 'euler'), and where r = 0 the target is that
    point, D_teacher(x_t; t). The student learns the teacher's trajectories: a guided teacher's, guidance included."""

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, q: float = 2, k: float = 8, b: float = 1,
                 c: float = 0.0, stage_nimg: int = 1 << 20, weighting: str = "ect", sigma_data: float = 0.5,
                 sample_sigmas: list[float] | None = None, teacher_step: str = "heun"):
        if weighting not in ("ect", "edm"):
            raise ValueError(f"weighting='{weighting}': expected 'ect' or 'edm'")
        if teacher_step not in ("heun", "euler"):
            raise ValueError(f"teacher_step='{teacher_step}': expected 'heun' or 'euler'")
        self.teacher_step = teacher_step
        self.teacher = None  # The distillation teacher, attached by the training loop.
        self.P_mean, self.P_std = P_mean, P_std
        self.q, self.k, self.b, self.c = q, k, b, c
        self.weighting, self.sigma_data = weighting, sigma_data
        self.sample_sigmas = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
        self.stage_nimg = int(stage_nimg)
        self.stage = 0

    def set_progress(self, cur_nimg: int) -> None:
        self.stage = int(cur_nimg) // self.stage_nimg

    def sample_t(self, shape, device: torch.device) -> torch.Tensor:
        """ln t ~ N(P_mean, P_std^2)."""
        return (self.P_mean + self.P_std * torch.randn(shape, device=device)).exp()

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None) -> torch.Tensor:
        t = self.sample_t([images.shape[0], 1, 1, 1], images.device)
        r = ect_r(t, self.stage, self.q, self.k, self.b)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        extra = {} if augment_labels is None else dict(augment_labels=augment_labels)
        n = torch.randn_like(y)
        devices = [y.device] if y.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # The target then draws the same dropout masks.
            at_t = net(y + t * n, t, labels, **extra)
        with torch.no_grad(), weights_left_as_they_are(net):
            x_r = (y + r * n) if self.teacher is None else self.teacher_ode_step(y + t * n, t, r, labels)
            at_r = net(x_r, r.clamp(min=1e-8), labels, **extra).to(torch.float32) if bool((r > 0).any()) else x_r
            target = torch.where(r > 0, at_r, x_r.to(torch.float32))
        return self.weighted(pseudo_huber(at_t - target, self.c), t, r).reshape(-1, 1, 1, 1)

    def teacher_ode_step(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                         labels: torch.Tensor | None) -> torch.Tensor:
        """x at r from x at t by one step of the teacher's ODE dx/dsigma = (x - D(x; sigma)) / sigma: Euler's, or
        Heun's (Algorithm 1) where r > 0; at r = 0 Euler's step is D(x; t) itself. Float32."""
        x = x.to(torch.float32)
        slope = (x - self.teacher(x, t, labels).to(torch.float32)) / t
        x_r = x + (r - t) * slope
        if self.teacher_step == "euler" or not bool((r > 0).any()):
            return x_r
        at_r = r.clamp(min=1e-8)
        slope_r = (x_r - self.teacher(x_r, at_r, labels).to(torch.float32)) / at_r
        return torch.where(r > 0, x + (r - t) * (slope + slope_r) / 2, x_r)

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "teacher"}

    def weighted(self, distance: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """w(t, r) d per image: d / (t - r) ('ect') or d (t^2 + sigma_data^2) / (t sigma_data)^2 ('edm')."""
        if self.weighting == "edm":
            return distance * ((t ** 2 + self.sigma_data ** 2) / (t * self.sigma_data) ** 2).flatten()
        return distance / (t - r).flatten()
