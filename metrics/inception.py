"""The FID detector: Inception-v3 of the TF graph ``inception-2015-12-05`` (its pool3 features), in plain PyTorch.

This is the network every published FID is computed with (TF's original FID code, StyleGAN's and EDM's
``fid.py``, pytorch-fid). It differs from torchvision's Inception-v3 in its weights and in three details
of the TF graph that change the numbers, mirrored here:
  - batch norm has no scale (gamma) and eps = 1e-3;
  - the average pools inside the mixed blocks ignore the zero padding (``count_include_pad=False``);
  - the pool branch of the last block (``mixed_10``) is a max pool, not an average pool.

Parameter names are the TF graph's op scopes (``mixed_4/tower_1/conv_2`` becomes ``mixed_4.tower_1.conv_2``),
the names NVIDIA's converted detector uses too, so its weights load by name.

Preprocessing follows NVIDIA's detector exactly: uint8 RGB in [0, 255] as float32, TF1 ``resize_bilinear``
to 299x299, then ``(x - 128) / 128``, with no rounding in between (see :func:`resize_tf1_bilinear`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048
INPUT_SIZE = 299
PREPROCESS_MODES = ("nvidia", "pytorch-fid")


class ConvBN(nn.Module):
    """TF's conv (no bias) + batch norm without scale (eps 1e-3, inference statistics) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._folded(x.dtype)
        return F.relu_(F.conv2d(x, weight, bias, self.stride, self.padding))

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch norm folded into the convolution: w * s and beta - mean * s with s = (var + eps)^(-1/2).

        One pass over the activations instead of two (about 1.15x the detector's throughput on a CPU), features
        within 2e-6 relative of the unfolded graph. Recomputed whenever a buffer is replaced or modified.
        """
        key = (dtype, *((t.data_ptr(), t._version) for t in (self.weight, self.beta, self.mean, self.var)))
        if getattr(self, "_folded_key", None) != key:
            scale = torch.rsqrt(self.var + 1e-3)
            layout = torch.channels_last if self.weight.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            weight = (self.weight * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=layout)
            self._folded_cache = (weight, (self.beta - self.mean * scale).to(dtype))
            self._folded_key = key
        return self._folded_cache


def _tower(*convs: ConvBN) -> nn.Sequential:
    """A chain of convs named as the TF graph names them: conv, conv_1, conv_2, ..."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(convs))]
    return nn.Sequential(OrderedDict(zip(names, convs)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF averages over the valid (unpadded) pixels only.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """``mixed``, ``mixed_1``, ``mixed_2``: the 35x35 blocks."""

    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _tower(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _tower(ConvBN(in_channels, pool_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_3x3(x))], dim=1)


class InceptionB(nn.Module):
    """``mixed_3``: reduction from 35x35 to 17x17."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """``mixed_4`` .. ``mixed_7``: the 17x17 blocks with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _tower(
            ConvBN(in_channels, c, 1), ConvBN(c, c, (1, 7), padding=(0, 3)), ConvBN(c, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _tower(
            ConvBN(in_channels, c, 1), ConvBN(c, c, (7, 1), padding=(3, 0)), ConvBN(c, c, (1, 7), padding=(0, 3)),
            ConvBN(c, c, (7, 1), padding=(3, 0)), ConvBN(c, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _tower(ConvBN(in_channels, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """``mixed_8``: reduction from 17x17 to 8x8."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(
            ConvBN(in_channels, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
            ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """``mixed_9``, ``mixed_10``: the 8x8 blocks with split 1x3 / 3x1 outputs.

    ``pool`` is 'avg' for ``mixed_9`` and 'max' for ``mixed_10`` (a quirk of the TF graph that FID keeps).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3: preprocessed [N, 3, 299, 299] in [-1, 1) -> features [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = InceptionA(192, pool_channels=32)
        self.mixed_1 = InceptionA(256, pool_channels=64)
        self.mixed_2 = InceptionA(288, pool_channels=64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, channels_7x7=128)
        self.mixed_5 = InceptionC(768, channels_7x7=160)
        self.mixed_6 = InceptionC(768, channels_7x7=160)
        self.mixed_7 = InceptionC(768, channels_7x7=192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, pool="avg")
        self.mixed_10 = InceptionE(2048, pool="max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5,
                      self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)
        return F.avg_pool2d(x, kernel_size=8, stride=8).reshape(-1, FEATURE_DIM)


# ----------------------------------------------------------------------------
# Preprocessing.

def resize_tf1_bilinear(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize float [N, C, H, W] to [N, C, size, size] as TF1's ``resize_bilinear`` (align_corners=False).

    TF1 samples destination pixel i at source coordinate ``i * in / out`` (no half-pixel centres), clamped
    at the border. NVIDIA's detector expresses this as ``grid_sample`` on an identity grid shifted by
    ``1/in - 1/out``; we build the grid the same way, in float32, so the numbers match its to the last bit.
    """
    n, c, h, w = images.shape
    theta = torch.eye(2, 3, device=images.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(images.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor, mode: str = "nvidia") -> torch.Tensor:
    """uint8-valued images [N, C, H, W] in [0, 255] (C = 1 or 3) -> detector input [N, 3, 299, 299].

    ``mode='nvidia'`` (the standard): TF1 resize, then ``(x - 128) / 128``.
    ``mode='pytorch-fid'``: pytorch-fid's ``interpolate`` resize (half-pixel centres) on ``x / 255``, then
    ``2x - 1``; only for comparing with numbers that pytorch-fid produced, which differ from the standard FID.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {list(images.shape)}")
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat([1, 3, 1, 1])
    if mode == "nvidia":
        return (resize_tf1_bilinear(x) - 128) / 128
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"unknown preprocessing '{mode}'; choose one of {', '.join(PREPROCESS_MODES)}")


class FIDDetector(nn.Module):
    """Images (uint8 values, [N, C, H, W]) -> pool3 features [N, 2048] float32: preprocessing + Inception."""

    def __init__(self, net: InceptionV3, preprocess_mode: str = "nvidia", weights_sha256: str = ""):
        super().__init__()
        self.weights_sha256 = weights_sha256  # Identifies the weights in cache keys.
        if preprocess_mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing '{preprocess_mode}'; choose one of {', '.join(PREPROCESS_MODES)}")
        self.net = net.eval().requires_grad_(False)
        self.preprocess_mode = preprocess_mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.preprocess_mode)
        if x.device.type == "cpu":
            # oneDNN's NHWC convolutions: about 1.2x the throughput on CPUs, same float32 math up to rounding
            # (benchmarks/); the weights are converted once, on the first call.
            if not self.net.conv.weight.is_contiguous(memory_format=torch.channels_last):
                self.net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with _ieee_float32_convolutions(x.device):
            return self.net(x)


@contextlib.contextmanager
def _ieee_float32_convolutions(device: torch.device):
    """cuDNN convolutions in true float32 (not TF32, PyTorch's default on Ampere and later GPUs, which moves
    the features by ~1e-3 relative and the FID with them); restores the user's setting afterwards."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if device.type != "cuda" or conv is None or not hasattr(conv, "fp32_precision"):
        yield
        return
    saved = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = saved
