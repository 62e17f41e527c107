"""EDM2's magnitude-preserving U-Net (config G) and its preconditioner with the uncertainty head.

Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving the Training Dynamics of Diffusion
Models" (CVPR 2024, arXiv 2312.02696). Equation numbers are those of the arXiv version (appendix included).

The design rule of Section 2 is that every layer keeps the expected magnitude (RMS) of its activations at 1 for
unit-magnitude input, and that the weights' own magnitude cannot drift:

- learned layers (``MPConv``) divide each output channel's weight by its norm at use (Eq. 47) and, while
  training, also rescale the stored weight to unit RMS per output channel (forced weight normalization, Eq. 66);
  there are no biases;
- the fixed-function layers are rescaled to preserve magnitude: ``mp_silu`` (Eq. 81), ``mp_sum`` (Eq. 88),
  ``mp_cat`` (Eq. 103), ``MPFourier`` (Eq. 75); the encoder normalizes each pixel over channels instead of
  group norm, attention is cosine attention on pixel-normalized q, k, v;
- the few places that must be able to leave unit magnitude get a learned scalar gain that starts at 0: the
  output layer (``out_gain``, so a fresh network's D is c_skip x) and each block's embedding modulation
  (``emb_gain``, so the modulation starts as the identity).

Class names, constructor arguments and tensor names are those of the official release (module
``training.networks_edm2``), so its pickles load here and ours there. Weights may be stored in any float dtype
(official snapshots keep the EMA network in float16); they are normalized in float32 and cast to the
activations' dtype on use.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from torch_utils import persistence

# RMS of silu(x) for x ~ N(0, 1) (Eq. 81).
SILU_RMS = 0.596


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x divided by its RMS over ``dim`` (default: every dimension but the first) plus ``eps``.

    Per output channel of a weight [C_out, C_in, ...] this is the normalization of Eq. 66 (unit RMS, i.e. norm
    sqrt(fan_in)); over the channels of an activation [N, C, H, W] it is pixel normalization (config F, in place of
    group normalization). The RMS is taken in float32 whatever x's dtype.
    """
    dims = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    count = math.prod(x.shape[d] for d in dims)
    rms = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32) / math.sqrt(count)
    return x / (rms + eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, Eq. 81: silu(x) / 0.596 has unit RMS for x ~ N(0, 1)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum, Eq. 88: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2). ``t`` is the
    balance: 0 gives a, 1 gives b; for uncorrelated unit-magnitude a and b the result has unit magnitude."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation, Eq. 103: a and b (of N_a and N_b channels along ``dim``) are scaled so
    that the result has unit magnitude and the two parts carry energy in the ratio (1 - t)^2 : t^2,
    independently of N_a and N_b."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(n_a)), b * (scale * t / math.sqrt(n_b))], dim=dim)


@functools.lru_cache(maxsize=None)
def _fir_kernel(taps: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """outer(taps, taps) / sum(taps)^2 in float32 on ``device``, made once per device: made anew at each call, its
    copy from the host would make the host wait for a CUDA device twice per resampling block."""
    with torch.inference_mode(False), torch.no_grad():
        taps_1d = torch.tensor(taps, dtype=torch.float32, device=device)
        return torch.outer(taps_1d, taps_1d) / taps_1d.sum() ** 2


def resample(x: torch.Tensor, taps: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or upsampling of [N, C, H, W] with the separable FIR filter ``taps`` (an even count, normalized
    to unit sum; the default [1, 1] is the 2x2 box: average pooling down, nearest-neighbour up), or x itself
    for mode 'keep'."""
    if mode == "keep":
        return x
    if mode not in ("down", "up") or len(taps) % 2:
        raise ValueError(f"resample: mode '{mode}' with {len(taps)} taps; expected 'keep', 'down' or 'up' with an "
                         f"even number of taps")
    if len(taps) == 2 and taps[0] == taps[1]:
        return _resample_box(x, mode)
    return _resample_fir(x, taps, mode)


def _resample_box(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The 2x2 box filter's resampling as average pooling ('down') or nearest-neighbour repetition ('up'): the
    values of the grouped convolution (up exactly, down to float rounding), which is many times slower in bfloat16
    on a CPU (docs/performance.md)."""
    return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2, mode="nearest")


def _resample_fir(x: torch.Tensor, taps: Sequence[float], mode: str) -> torch.Tensor:
    """``resample`` with any even FIR filter, as a grouped (transposed) convolution of stride 2."""
    kernel = _fir_kernel(tuple(float(tap) for tap in taps), x.device)
    channels, padding = x.shape[1], (len(taps) - 1) // 2
    if mode == "down":
        kernel = kernel.to(x.dtype).expand(channels, 1, *kernel.shape)
        return F.conv2d(x, kernel, stride=2, padding=padding, groups=channels)
    kernel = (kernel * 4).to(x.dtype).expand(channels, 1, *kernel.shape)  # Gain 4: each output sees 1/4 of the taps.
    return F.conv_transpose2d(x, kernel, stride=2, padding=padding, groups=channels)


@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features, Eq. 75: sqrt(2) cos(2 pi (f c + phi)) with frequencies f ~ N(0,
    bandwidth^2) and phases phi ~ U(0, 1) fixed at construction (buffers ``freqs`` = 2 pi f, ``phases`` =
    2 pi phi). Maps scalars [N] to [N, num_channels] features of unit RMS."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel`` [k, k]) or fully connected layer (``kernel`` []), no bias.

    At use each output channel's weight is normalized to unit norm and scaled by ``gain`` (Eq. 47: w /
    ||w|| with ||w|| computed as sqrt(fan_in) times the RMS), so unit-magnitude input gives output of magnitude
    ``gain``. In training mode the stored weight is first rescaled in place to unit RMS per output channel
    (forced weight normalization, Eq. 66), so that the weights cannot grow and the effective learning rate is the
    schedule's (config E). A call that updates no weight (a consistency loss's target) turns that off through
    ``force_weight_norm``.
    """
    force_weight_norm = True

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        if self.training and self.force_weight_norm:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        weight = normalize(self.weight.to(torch.float32))
        # gain / sqrt(fan_in) is formed in the gain's own dtype: float16 for the official float16 EMA snapshots,
        # whose official outputs depend on that rounding (about 6e-5 relative).
        weight = (weight * (gain / math.sqrt(weight[0].numel()))).to(x.dtype)
        if weight.ndim == 2:
            return x @ weight.t()
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention over the pixels of qkv [N, 3 C, H, W] (channels ordered head, channel, q/k/v) with q, k
    and v each normalized to unit RMS per head and pixel (cosine attention), softmax(q k^T /
    sqrt(C / heads)) v. Returns [N, C, H, W]."""
    n, _, h, w = qkv.shape
    qkv = normalize(qkv.reshape(n, num_heads, -1, 3, h * w), dim=2)
    q, k, v = (part.transpose(2, 3) for part in qkv.unbind(3))  # Each [N, heads, H*W, C/heads].
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(2, 3).reshape(n, -1, h, w)


def clip_activations(x: torch.Tensor, limit: float) -> torch.Tensor:
    """x clamped to +-limit, in place. On a CPU, where reading a value back costs no wait, x is returned untouched
    when every value is strictly inside the limit: the same values and gradient (in-place clamp's gradient is 0
    at the limit itself), without clamp's backward mask (three passes over the activations)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.abs().amax().item() < limit:
        return x
    return x.clamp_(-limit, limit)


@persistence.persistent_class
class Block(torch.nn.Module):
    """One encoder ('enc') or decoder ('dec') block of the U-Net (the paper's Figure 21).

    The main path is resampled first ('keep', 'down' or 'up'). An encoder block then maps it to
    ``out_channels`` (1x1 ``conv_skip`` when the count changes) and pixel-normalizes it, so the residual branch
    sees the new width; a decoder block feeds the (concatenated) input to the residual branch and maps the main
    path afterwards. Residual branch: mp_silu, 3x3 conv, modulation by 1 + the embedding's linear map (gain
    ``emb_gain``, 0 at init), mp_silu, dropout, 3x3 conv. The branches merge with mp_sum (``res_balance``),
    then optional cosine self-attention merges the same way (``attn_balance``), and activations are clipped to
    +-``clip_act`` (None: no clipping).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor='{flavor}': expected 'enc' or 'dec'")
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_mode, self.resample_filter = resample_mode, resample_filter
        self.res_balance, self.attn_balance, self.dropout, self.clip_act = res_balance, attn_balance, dropout, clip_act
        self.num_heads = out_channels // channels_per_head if attention else 0

        # Created (random draws) and registered (state_dict order) in the official order.
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        width = out_channels
        self.conv_res0 = MPConv(in_channels if flavor == "dec" else width, width, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, width, kernel=[])
        self.conv_res1 = MPConv(width, width, kernel=[3, 3])
        self.conv_skip = None if in_channels == width else MPConv(in_channels, width, kernel=[1, 1])
        self.attn_qkv, self.attn_proj = None, None
        if self.num_heads:
            self.attn_qkv = MPConv(width, 3 * width, kernel=[1, 1])
            self.attn_proj = MPConv(width, width, kernel=[1, 1])

    def residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.conv_res0(mp_silu(x)) * modulation[:, :, None, None].to(x.dtype)
        y = mp_silu(y)
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        return self.conv_res1(y)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)
            x = mp_sum(x, self.residual(x, emb), t=self.res_balance)
        else:
            y = self.residual(x, emb)
            x = mp_sum(x if self.conv_skip is None else self.conv_skip(x), y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_proj(cosine_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = clip_activations(x, self.clip_act)
        return x


def _level_name(resolution: int, what: str) -> str:
    return f"{resolution}x{resolution}_{what}"


@persistence.persistent_class
class UNet(torch.nn.Module):
    """The magnitude-preserving U-Net F (Figure 2 / Figure 21, config G).

    Levels run at ``img_resolution`` >> level with ``model_channels * channel_mult[level]`` channels. The
    encoder starts with a 3x3 conv of the input plus a constant-one channel, opens every later level with a
    downsampling block, and has ``num_blocks`` blocks per level; every encoder output is kept as a skip. The
    decoder opens the lowest level with two blocks (the first with attention) and every other level with an
    upsampling block, then has ``num_blocks + 1`` blocks per level, each taking one skip through mp_cat
    (``concat_balance``). Blocks at ``attn_resolutions`` have attention. The embedding is mp_silu of the noise
    level's Fourier features through a linear layer, mp_sum'd with the class label's (``label_balance``). The
    output conv has gain ``out_gain``, 0 at init.

    ``patch_size`` P > 1 (ours, not official) runs the U-Net on P x P patches of pixels stacked as channels
    (space-to-depth, as the patch embedding of DiT or U-ViT and the "simple diffusion" U-Nets of Hoogeboom et
    al. 2023): an image of C x H x W enters as C P^2 x H/P x W/P, and the output conv's C P^2 channels go back to
    their pixels. The levels then start at ``img_resolution`` / P: a quarter of the pixels at the costliest level.

    ``dropout_res`` (ours): the blocks' dropout only at levels of that resolution and below (ECT's consistency tuning
    of EDM2's networks drops out at 16x16 and below); None: at every level.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, patch_size: int = 1,
                 dropout_res: int | None = None, **block_kwargs):
        super().__init__()
        if patch_size < 1 or img_resolution % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide img_resolution={img_resolution}")
        self.patch_size = patch_size
        img_resolution, img_channels = img_resolution // patch_size, img_channels * patch_size ** 2
        widths = [model_channels * m for m in channel_mult]
        noise_channels = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb_channels = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        def block(cin: int, cout: int, res: int, **kwargs) -> Block:
            if dropout_res is not None and res > dropout_res:  # Dropout only at and below dropout_res (ECT).
                return Block(cin, cout, emb_channels, **kwargs, **{**block_kwargs, "dropout": 0})
            return Block(cin, cout, emb_channels, **kwargs, **block_kwargs)

        resolutions = [img_resolution >> level for level in range(len(widths))]
        self.enc = torch.nn.ModuleDict()
        width = img_channels + 1
        for level, (res, level_width) in enumerate(zip(resolutions, widths)):
            if level == 0:
                self.enc[_level_name(res, "conv")] = MPConv(width, level_width, kernel=[3, 3])
                width = level_width
            else:
                self.enc[_level_name(res, "down")] = block(width, width, res, flavor="enc", resample_mode="down")
            for index in range(num_blocks):
                self.enc[_level_name(res, f"block{index}")] = block(width, level_width, res, flavor="enc",
                                                                    attention=res in attn_resolutions)
                width = level_width

        skip_widths = [layer.out_channels for layer in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res, level_width = resolutions[level], widths[level]
            if level == len(widths) - 1:
                self.dec[_level_name(res, "in0")] = block(width, width, res, flavor="dec", attention=True)
                self.dec[_level_name(res, "in1")] = block(width, width, res, flavor="dec")
            else:
                self.dec[_level_name(res, "up")] = block(width, width, res, flavor="dec", resample_mode="up")
            for index in range(num_blocks + 1):
                cin = width + skip_widths.pop()
                self.dec[_level_name(res, f"block{index}")] = block(cin, level_width, res, flavor="dec",
                                                                    attention=res in attn_resolutions)
                width = level_width
        self.out_conv = MPConv(width, img_channels, kernel=[3, 3])
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.label_balance, self.concat_balance = label_balance, concat_balance

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # One-hot labels times sqrt(label_dim) have unit RMS.
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """x [N, img_channels, H, W] (already scaled by c_in), noise_labels [N] (c_noise), class_labels
        [N, label_dim] one-hot or None; returns F [N, img_channels, H, W] in x's dtype."""
        emb = self.embedding(noise_labels, class_labels)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:  # The opening blocks of a level ('in0', 'in1', 'up') take no skip.
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return F.pixel_shuffle(x, self.patch_size) if self.patch_size > 1 else x


class Coefficients(NamedTuple):
    """What ``Precond.coefficients`` gives for sigma [N, 1, 1, 1]: the scalings of Eq. 7 around the U-Net."""
    c_skip: torch.Tensor    # [N, 1, 1, 1]
    c_out: torch.Tensor     # [N, 1, 1, 1]
    c_in: torch.Tensor      # [N, 1, 1, 1]
    c_noise: torch.Tensor   # [N]


@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM preconditioning (EDM paper Eq. 7 and Table 1, column 'EDM') around the magnitude-preserving U-Net,
    plus the uncertainty head u(sigma) of EDM2 Eq. 21 (``logvar_fourier``, ``logvar_linear``: a linear map of
    the Fourier features of c_noise), which weights the training loss.

    ``net(x, sigma, class_labels=None, force_fp32=False, return_logvar=False)``: x [N, C, H, W], sigma a scalar
    or [N], class_labels [N, label_dim] one-hot (None: zeros). Returns D(x; sigma) in float32, and with
    ``return_logvar`` also u(sigma) [N, 1, 1, 1]. The U-Net runs in float16 when ``use_fp16`` is set and x is on
    a CUDA device, in bfloat16 when ``use_bf16`` is set (ours, not official; any device), else in float32;
    ``force_fp32`` overrides both.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, use_bf16: bool = False, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.use_bf16, self.sigma_data = use_fp16, use_bf16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """Table 1, EDM column, for sigma [N, 1, 1, 1]; c_noise flattened to [N]."""
        var_data, var_total = self.sigma_data ** 2, sigma ** 2 + self.sigma_data ** 2
        c_skip = var_data / var_total
        c_in = 1 / var_total.sqrt()
        c_out = sigma * self.sigma_data * c_in
        c_noise = sigma.flatten().log() / 4
        return Coefficients(c_skip, c_out, c_in, c_noise)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma) [N, 1, 1, 1] of Eq. 21 for c_noise [N]."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def compute_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        if force_fp32:
            return torch.float32
        if self.use_fp16 and x.device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if getattr(self, "use_bf16", False) else torch.float32

    def label_batch(self, class_labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """One-hot labels as float32 [N, label_dim] (zeros [1, label_dim] when none are given), None if
        unconditional."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                return_logvar: bool = False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c = self.coefficients(sigma)
        F_x = self.unet((c.c_in * x).to(self.compute_dtype(x, force_fp32)), c.c_noise,
                        self.label_batch(class_labels, x.device))
        D_x = c.c_skip * x + c.c_out * F_x.to(torch.float32)
        return (D_x, self.logvar(c.c_noise)) if return_logvar else D_x
