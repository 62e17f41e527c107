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


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights for the initialization schemes the official configs name."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode='{mode}': expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer, y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def make_resample_filter(taps: Sequence[float]) -> torch.Tensor:
    """Separable FIR filter [1, 1, k, k], normalized to unit DC gain (e.g. [1,1] box, [1,3,3,1] bilinear)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()


def resample(x: torch.Tensor, f: torch.Tensor, up: bool, padding: int) -> torch.Tensor:
    """Upsample (transposed convolution, gain 4) or downsample (convolution) each channel of ``x`` by 2 with the
    FIR filter ``f`` [1, 1, k, k]. On the CPU, PyTorch's bfloat16 and float16 depthwise convolutions are 5-10x
    slower than the float32 ones (a fifth of a bf16 training step), so there they run in float32 and round back."""
    dtype, channels = x.dtype, x.shape[1]
    compute_dtype = torch.float32 if x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype
    x, f = x.to(compute_dtype), f.to(compute_dtype)
    if up:
        x = F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
    else:
        x = F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
    return x.to(dtype)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2x FIR up- or downsampling before it.

    ``kernel=0`` gives a pure resampling layer with no weights. ``fused_resample`` merges the resampling
    into the convolution's padding/stride (used by NCSN++'s residual encoder path).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        self.register_buffer("resample_filter", make_resample_filter(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = resample(x, f, up=True, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = resample(x, f, up=False, padding=0)
        else:
            if self.up:
                x = resample(x, f, up=True, padding=f_pad)
            if self.down:
                x = resample(x, f, up=False, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalization with at least ``min_channels_per_group`` channels in each group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc_on_cpu = x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        # PyTorch's CPU group norm is several times slower on channels_last tensors than on contiguous
        # ones (worst at small resolutions), more than the two copies cost.
        y = F.group_norm(x.contiguous() if nhwc_on_cpu else x, num_groups=self.num_groups,
                         weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)
        return y.contiguous(memory_format=torch.channels_last) if nhwc_on_cpu else y


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of a scalar (the noise label): [cos(x f_i), sin(x f_i)]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar (NCSN++): [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


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
