"""Preconditioning: the paper's Eq. 7 and the four columns of Table 1.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

Every preconditioner here is the same wrapper around a raw network F (a ``SongUNet`` or ``DhariwalUNet``);
a column of Table 1 is just its ``coefficients(sigma)``, plus, for VP and iDDPM, the sigma(t) it was
trained with (needed for c_noise and for the valid sigma range).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from torch_utils import persistence

from .unets import DhariwalUNet, SongUNet



class Coefficients(NamedTuple):
    """Eq. 7's c_skip(sigma), c_out(sigma), c_in(sigma) and c_noise(sigma), each broadcastable against
    [N, 1, 1, 1] (a number where it does not depend on sigma)."""
    c_skip: torch.Tensor | float
    c_out: torch.Tensor | float
    c_in: torch.Tensor | float
    c_noise: torch.Tensor


_MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class Precond(torch.nn.Module):
    """Eq. 7 around a raw network. Subclasses supply ``coefficients(sigma)`` and the sigma range.

    Call interface (that of the official networks): ``net(x, sigma, class_labels=None, force_fp32=False,
    **model_kwargs)`` with ``sigma`` a scalar or one value per image and ``class_labels`` one-hot; returns
    D(x; sigma) in float32. ``model_kwargs`` (e.g. ``augment_labels``) go on to F.

    F runs in float16 when ``use_fp16`` is set and x is on a CUDA device (as the official), in bfloat16 when
    ``use_bf16`` is set (any device), else in float32; ``force_fp32`` overrides both.
    """

    sigma_min: float
    sigma_max: float

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "DhariwalUNet", model_out_channels: int | None = None, use_bf16: bool = False,
                 **model_kwargs):
        super().__init__()
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type='{model_type}': expected one of {', '.join(_MODEL_TYPES)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.model = _MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=model_out_channels or img_channels,
                                              label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Noise levels this network can be evaluated at (identity, except for iDDPM's discrete levels)."""
        return torch.as_tensor(sigma)

    def compute_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        if force_fp32:
            return torch.float32
        if self.use_fp16 and x.device.type == "cuda":
            return torch.float16
        if self.use_bf16:
            return torch.bfloat16
        return torch.float32

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                **model_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.compute_dtype(x, force_fp32)

        c = self.coefficients(sigma)
        F_x = self.model((c.c_in * x).to(dtype), c.c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c.c_skip * x + c.c_out * F_x[:, :self.img_channels].to(torch.float32)


def _as_tensor(value) -> torch.Tensor:
    """torch.as_tensor that leaves tensors where they are (also inside a ``torch.device('meta')`` context)."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """VP noise level, Table 1: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = _as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d: float, beta_min: float) -> torch.Tensor:
    """Inverse of the VP sigma(t): t = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d."""
    sigma = _as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


@persistence.persistent_class
class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021), Table 1 column 'VP'."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device="cpu")))

    def sigma(self, t) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return Coefficients(c_skip, c_out, c_in, c_noise)


@persistence.persistent_class
class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021), Table 1 column 'VE'."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return Coefficients(c_skip, c_out, c_in, c_noise)


def iddpm_alpha_bar(j, M: int, C_2: float) -> torch.Tensor:
    """iDDPM cosine schedule: alpha_bar_j = sin^2(pi/2 * j / (M (C_2 + 1)))."""
    j = _as_tensor(j)
    return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_sigma_levels(M: int, C_1: float, C_2: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The discrete noise levels u_0 > u_1 > ... > u_M = 0 of iDDPM (Table 1 footnote):
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1).

    The ratios and their clip are float32, as the official code forms them from integer indices (which promote to
    the default dtype); u is ``dtype``: float32 in the preconditioning's buffer, float64 in the time steps."""
    u = torch.zeros(M + 1, dtype=dtype, device="cpu")  # On the CPU even while a network is built on 'meta'.
    for j in range(M, 0, -1):
        j_prev, j_cur = torch.tensor(j - 1, device="cpu"), torch.tensor(j, device="cpu")
        ratio = (iddpm_alpha_bar(j_prev, M, C_2) / iddpm_alpha_bar(j_cur, M, C_2)).clip(min=C_1)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio.to(dtype) - 1).sqrt()
    return u


@persistence.persistent_class
class iDDPMPrecond(Precond):
    """Improved DDPM (Nichol & Dhariwal 2021), Table 1 column 'iDDPM'. F also predicts variances, which are
    ignored: only the first ``img_channels`` output channels are used."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_out_channels=img_channels * 2, **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer("u", iddpm_sigma_levels(M, C_1, C_2))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def round_sigma(self, sigma, return_index: bool = False):
        """Snap each sigma to the nearest of the discrete levels u_j (or return the index j)."""
        sigma = _as_tensor(sigma)
        distance = (sigma.to(self.u.device).to(torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        index = distance.argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return Coefficients(c_skip, c_out, c_in, c_noise)


@persistence.persistent_class
class EDMPrecond(Precond):
    """The paper's preconditioning, Table 1 column 'EDM' (Section 5, Appendix B.6)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return Coefficients(c_skip, c_out, c_in, c_noise)
