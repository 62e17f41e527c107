"""Building blocks of the DDPM++, NCSN++ and ADM U-Nets.

Weights are stored in float32 and cast to the activations' dtype on use, so one network runs in fp32,
fp16 or bf16 without conversion. Parameter and buffer names follow the official checkpoints.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence


# (numerator, denominator) of each family's weight variance.
_FAN_VARIANCE = {"xavier": lambda fan_in, fan_out: (2, fan_in + fan_out),
                 "kaiming": lambda fan_in, fan_out: (1, fan_in)}


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights of variance 2 / (fan_in + fan_out) ('xavier_*', Glorot & Bengio) or 1 / fan_in ('kaiming_*'),
    drawn uniformly ('*_uniform': U(-a, a), whose variance is a^2 / 3) or from a Gaussian ('*_normal')."""
    family, _, distribution = mode.partition("_")
    if family not in _FAN_VARIANCE or distribution not in ("uniform", "normal"):
        raise ValueError(f"init_mode='{mode}': expected xavier_uniform, xavier_normal, kaiming_uniform or "
                         f"kaiming_normal")
    numerator, denominator = _FAN_VARIANCE[family](fan_in, fan_out)
    if distribution == "normal":
        return math.sqrt(numerator / denominator) * torch.randn(*shape)
    return math.sqrt(3 * numerator / denominator) * (torch.rand(*shape) * 2 - 1)


def _initial_weight_and_bias(weight_shape: Sequence[int], with_bias: bool, init_mode: str, init_weight: float,
                             init_bias: float, fan_in: int, fan_out: int):
    """A layer's weight and (if asked for) bias [weight_shape[0]], drawn in that order from the same scheme and
    scaled by ``init_weight`` / ``init_bias`` (0 gives layers that start as zero)."""
    weight = torch.nn.Parameter(weight_init(weight_shape, init_mode, fan_in, fan_out) * init_weight)
    if not with_bias:
        return weight, None
    return weight, torch.nn.Parameter(weight_init(weight_shape[:1], init_mode, fan_in, fan_out) * init_bias)


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer, y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = _initial_weight_and_bias([out_features, in_features], bias, init_mode, init_weight,
                                                          init_bias, fan_in=in_features, fan_out=out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def make_resample_filter(taps: Sequence[float]) -> torch.Tensor:
    """Separable FIR filter [1, 1, k, k], normalized to unit DC gain (e.g. [1,1] box, [1,3,3,1] bilinear)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()


def resample(x: torch.Tensor, f: torch.Tensor, up: bool, padding: int) -> torch.Tensor:
    """Upsample (transposed convolution, gain 4) or downsample (convolution) each channel of ``x`` by 2 with the
    FIR filter ``f`` [1, 1, k, k]. On the CPU, PyTorch's bfloat16 and float16 depthwise convolutions are several
    times slower than the float32 ones (docs/performance.md), so there they run in float32 and round back."""
    dtype, channels = x.dtype, x.shape[1]
    compute_dtype = torch.float32 if x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype
    x, f = x.to(compute_dtype), f.to(compute_dtype)
    if up:
        x = F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
    else:
        x = F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
    return x.to(dtype)


def conv_steps(kernel: int, filter_taps: int, up: bool, down: bool, fused: bool) -> list[tuple[str, int]]:
    """What ``Conv2d`` does, in order, as ('up' | 'down' | 'conv', padding) steps.

    Plain: resample (padded to keep the image centred), then convolve. Fused (NCSN++'s residual encoder path):
    the convolution runs at the higher resolution and the two paddings are traded so that together they pad
    once, which is how those networks were trained.
    """
    conv_pad = kernel // 2
    filter_pad = (filter_taps - 1) // 2 if up or down else 0
    if fused and kernel and up:
        return [("up", max(filter_pad - conv_pad, 0)), ("conv", max(conv_pad - filter_pad, 0))]
    if fused and kernel and down:
        return [("conv", conv_pad + filter_pad), ("down", 0)]
    resampling = [("up", filter_pad)] if up else [("down", filter_pad)] if down else []
    return resampling + ([("conv", conv_pad)] if kernel else [])


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2x FIR up- or downsampling before it.

    ``kernel=0`` gives a pure resampling layer with no weights. ``fused_resample`` merges the resampling
    into the convolution's padding/stride (used by NCSN++'s residual encoder path); see ``conv_steps``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.steps = conv_steps(kernel, len(resample_filter), up, down, fused_resample)
        self.weight, self.bias = None, None
        if kernel:
            taps = kernel * kernel
            self.weight, self.bias = _initial_weight_and_bias(
                [out_channels, in_channels, kernel, kernel], bias, init_mode, init_weight, init_bias,
                fan_in=in_channels * taps, fan_out=out_channels * taps)
        self.register_buffer("resample_filter", make_resample_filter(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step, padding in self.steps:
            if step == "conv":
                x = F.conv2d(x, self.weight.to(x.dtype), padding=padding)
            else:
                x = resample(x, self.resample_filter, up=step == "up", padding=padding)
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalization with at least ``min_channels_per_group`` channels in each group; learned per-channel
    scale (``weight``, starts at 1) and shift (``bias``, starts at 0)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
        self.num_groups, self.eps = min(num_groups, num_channels // min_channels_per_group), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc_on_cpu = x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        # PyTorch's CPU group norm is several times slower on channels_last tensors than on contiguous
        # ones (worst at small resolutions), more than the two copies cost.
        y = F.group_norm(x.contiguous() if nhwc_on_cpu else x, num_groups=self.num_groups,
                         weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)
        return y.contiguous(memory_format=torch.channels_last) if nhwc_on_cpu else y


def _cos_sin(angles: torch.Tensor) -> torch.Tensor:
    """[N, K] angles -> [N, 2K] features [cos, sin]."""
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def geometric_frequencies(count: int, max_positions: float, endpoint: bool, device=None) -> torch.Tensor:
    """``count`` frequencies from 1 down to 1 / max_positions, geometrically spaced (Vaswani et al. 2017);
    with ``endpoint`` the last one is exactly 1 / max_positions."""
    exponents = torch.arange(count, dtype=torch.float32, device=device) / (count - 1 if endpoint else count)
    return (1 / max_positions) ** exponents


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of a scalar (the noise label): [cos(x f_i), sin(x f_i)]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = geometric_frequencies(self.num_channels // 2, self.max_positions, self.endpoint, x.device)
        return _cos_sin(torch.outer(x, freqs.to(x.dtype)))


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar (NCSN++): [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _cos_sin(torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype)))


ATTENTION_IMPLS = ("sdpa", "einsum")


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) applied to v, for [batch*heads, channels, positions] tensors.

    ``impl='sdpa'`` uses PyTorch's fused scaled_dot_product_attention; ``impl='einsum'`` forms the weight
    matrix explicitly, as the official code does (the plain reference the benchmarks compare against). Both
    compute the softmax in float32 for fp16 activations, as the official (the fused CUDA kernels accumulate
    in float32).
    """
    dtype = q.dtype
    if impl == "einsum":
        c = q.shape[1]
        weights = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(c)).to(torch.float32))
        weights = weights.softmax(dim=2).to(dtype)
        return torch.einsum("nqk,nck->ncq", weights, v)
    if impl != "sdpa":
        raise ValueError(f"attention impl='{impl}': expected one of {', '.join(ATTENTION_IMPLS)}")
    if dtype == torch.float16 and q.device.type != "cuda":
        q, k, v = q.float(), k.float(), v.float()
    # The fused kernels (flash / memory-efficient, CPU and CUDA) take only 4-D [batch, heads, positions, channels]
    # tensors whose channels are contiguous; anything else silently runs the unfused math fallback.
    q, k, v = (t.transpose(1, 2).unsqueeze(0).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).squeeze(0).transpose(1, 2)
    # Contiguous [batch*heads, channels, positions], as einsum gives: a transposed view would reach the next
    # convolution as a channels_last image and switch the rest of the U-Net to NHWC (slower on the CPU).
    return out.to(dtype).contiguous()


def _shortcut(in_channels: int, out_channels: int, resampling: dict, resample_proj: bool,
              init: dict) -> Conv2d | None:
    """The residual connection of a block: identity when shape is kept; else resampling, with a 1x1 projection
    when the width changes or ``resample_proj`` asks for one."""
    if in_channels == out_channels and not (resampling["up"] or resampling["down"]):
        return None
    kernel = 1 if resample_proj or in_channels != out_channels else 0
    return Conv2d(in_channels, out_channels, kernel=kernel, **resampling, **init)


def _attention_heads(attention: bool, num_heads: int | None, channels_per_head: int, channels: int) -> int:
    """0 for a block without attention; else ``num_heads``, or as many heads of ``channels_per_head`` as fit."""
    if not attention:
        return 0
    return num_heads if num_heads is not None else channels // channels_per_head


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block of both U-Nets: GroupNorm-SiLU-Conv, noise-embedding modulation, GroupNorm-SiLU-Dropout-Conv,
    skip connection, then optional multi-head self-attention.

    ``adaptive_scale`` (ADM) modulates with scale and shift from the embedding; otherwise the embedding is
    added (DDPM++/NCSN++). Outputs are multiplied by ``skip_scale`` after each residual sum.
    """

    attention_impl = "sdpa"  # See self_attention; set per instance by training.perf.set_attention_impl.

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        resampling = dict(up=up, down=down, resample_filter=resample_filter)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        # Residual branch: conv0 changes width (and resolution), the embedding modulates, conv1 starts near zero.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resampling, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = _shortcut(in_channels, out_channels, resampling, resample_proj, init)

        self.num_heads = _attention_heads(attention, num_heads, channels_per_head, out_channels)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        h = self._condition(self.conv0(F.silu(self.norm0(x))), emb)
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(shortcut) * self.skip_scale
        return self._attend(x) if self.num_heads else x

    def _condition(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The noise embedding enters here: ADM scales and shifts the normalized features (``adaptive_scale``),
        DDPM++/NCSN++ add it before normalizing; SiLU after either."""
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if not self.adaptive_scale:
            return F.silu(self.norm1(h.add_(params)))
        scale, shift = params.chunk(chunks=2, dim=1)
        return F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over positions, added to ``x`` and scaled like the residual sum."""
        n, c, height, width = x.shape
        # Channels are laid out as [head, channel, (q, k, v)], as in the official checkpoints.
        qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, height * width)
        attended = self_attention(*qkv.unbind(2), impl=self.attention_impl).reshape(n, c, height, width)
        return self.proj(attended).add_(x) * self.skip_scale
