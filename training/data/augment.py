"""Non-leaking augmentation (paper Section 5 and Appendix F.2; Karras et al. 2020, "Training Generative
Adversarial Networks with Limited Data").

Each image is transformed with probability ``p`` times a per-transform multiplier, and the transform's
parameters are returned as a label vector that the network is conditioned on (``augment_labels``). At
sampling time the labels are zero, which asks the network for un-augmented images, so the augmentations do
not leak into the generated distribution.

Geometric transforms are composed per image as 3x3 homogeneous matrices that map *output* pixel coordinates
to *input* pixel coordinates (centred on the image, in pixels) and executed in one resampling pass: reflect
padding, 2x upsampling with the orthogonal 'sym6' wavelet low-pass filter, bilinear sampling on the 2x grid,
and 2x downsampling with the same filter. Because the filter is orthonormal, up- then down-sampling at
the same grid is exactly the identity, and the 2x oversampling keeps the bilinear step from blurring or
aliasing much. Color transforms are 4x4 matrices on (R, G, B, 1).

The constructor takes the official keyword arguments; official configs use
``AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)``, whose labels
have 9 entries: [xflip, yflip, log2-scale / scale_std, cos(rot) - 1, sin(rot), aniso * cos(r), aniso * sin(r),
translate_x / (W * std), translate_y / (H * std)]. Every enabled transform contributes its entries, in the
order of the constructor's arguments (see ``label_dim``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

# Low-pass decomposition filter of the 'sym6' wavelet (orthonormal: sum_k h[k] h[k + 2m] = delta_m).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_FILTER_DELAY = 5      # Tap aligned with the sample being produced; the same in up- and downsampling.
_FILTER_RADIUS = 3     # Support of the filter, in output pixels on each side.
# Where upsampled sample j sits, in input pixels: j / 2 + _UP_PHASE. The filter's centroid (its delay at low
# frequencies) is tap 5.098, not 5, so the samples sit slightly left of j / 2.
_UP_PHASE = (_FILTER_DELAY - float(np.dot(np.arange(len(SYM6)), SYM6) / np.sum(SYM6))) / 2


# ----------------------------------------------------------------------------
# Batched homogeneous matrices, [N, 3, 3] (2D) and [N, 4, 4] (color).

def _stack_matrix(rows: list[list], like: torch.Tensor) -> torch.Tensor:
    entries = [e if isinstance(e, torch.Tensor) else torch.full_like(like, float(e)) for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(like.shape + (len(rows), len(rows)))


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def translate3d(t: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by theta about a unit axis (Rodrigues' formula)."""
    vx, vy, vz = (float(v) for v in axis[:3])
    c, s = theta.cos(), theta.sin()
    cc = 1 - c
    return _stack_matrix([
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1]], theta)


# ----------------------------------------------------------------------------
# Resampling.

def _filter(channels: int, horizontal: bool, like: torch.Tensor) -> torch.Tensor:
    h = torch.tensor(SYM6, dtype=like.dtype, device=like.device)
    shape = [1, len(SYM6)] if horizontal else [len(SYM6), 1]
    return h.reshape(1, 1, *shape).repeat(channels, 1, 1, 1)


def upsample2x(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]; output sample j sits at input position j / 2 + _UP_PHASE."""
    C = images.shape[1]
    for horizontal in (True, False):
        pad = (0, _FILTER_DELAY) if horizontal else (_FILTER_DELAY, 0)
        stride = (1, 2) if horizontal else (2, 1)
        images = F.conv_transpose2d(images, _filter(C, horizontal, images), stride=stride, padding=pad, groups=C)
    return images


def downsample2x(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`upsample2x` on band-limited content: [N, C, 2H, 2W] -> [N, C, H, W]."""
    C = images.shape[1]
    for horizontal in (True, False):
        pad = (0, _FILTER_DELAY) if horizontal else (_FILTER_DELAY, 0)
        stride = (1, 2) if horizontal else (2, 1)
        images = F.conv2d(images, _filter(C, horizontal, images), stride=stride, padding=pad, groups=C)
    return images


def _reflect_margins(G_inv: torch.Tensor, H: int, W: int) -> list[int]:
    """Padding [left, right, top, bottom] so that every input point sampled for the output (plus the
    filter support) lies inside the padded image. Bounded by what reflect padding allows (size - 1)."""
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=G_inv.dtype,
                           device=G_inv.device)
    points = G_inv @ corners.t()                                     # [N, xyz, corner]
    x, y = points[:, 0], points[:, 1]
    reach = 2 * _FILTER_RADIUS
    needed = [-x.min() - cx + reach, x.max() - cx + reach, -y.min() - cy + reach, y.max() - cy + reach]
    limits = [W - 1, W - 1, H - 1, H - 1]
    return [int(min(max(math.ceil(float(m)), 0), limit)) for m, limit in zip(needed, limits)]


def apply_geometric(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample each image so that output pixel Y shows input point G_inv @ Y (centred pixel coordinates)."""
    N, C, H, W = images.shape
    left, right, top, bottom = _reflect_margins(G_inv, H, W)
    upsampled = upsample2x(F.pad(images, [left, right, top, bottom], mode="reflect"))

    # Output grid at 2x, extended by the filter radius so the final downsampling sees valid samples.
    r = _FILTER_RADIUS
    ky = torch.arange(2 * (H + 2 * r), device=images.device, dtype=images.dtype)
    kx = torch.arange(2 * (W + 2 * r), device=images.device, dtype=images.dtype)
    Y = torch.stack(torch.meshgrid(kx / 2 + _UP_PHASE - r - (W - 1) / 2, ky / 2 + _UP_PHASE - r - (H - 1) / 2,
                                   indexing="xy"), dim=-1)          # [2H', 2W', xy]
    Y = torch.cat([Y, torch.ones_like(Y[..., :1])], dim=-1).reshape(-1, 3)
    X = (G_inv.to(images.dtype) @ Y.t())[:, :2]                      # [N, xy, points]

    # Input centred coordinates -> index in the upsampled image -> grid_sample's [-1, 1] (align_corners=False).
    jx = 2 * (X[:, 0] + left + (W - 1) / 2 - _UP_PHASE)
    jy = 2 * (X[:, 1] + top + (H - 1) / 2 - _UP_PHASE)
    grid = torch.stack([(2 * jx + 1) / upsampled.shape[3] - 1, (2 * jy + 1) / upsampled.shape[2] - 1], dim=-1)
    grid = grid.reshape(N, len(ky), len(kx), 2)
    resampled = F.grid_sample(upsampled, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return downsample2x(resampled)[:, :, r:r + H, r:r + W]


def _color_rgb(pixels: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[N, 3, P] pixels through the affine part of [N, 4, 4] matrices."""
    return M[:, :3, :3] @ pixels + M[:, :3, 3:]


def _color_gray(pixels: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[N, 1, P] pixels read as (y, y, y); the result is the mean of the three transformed channels."""
    mean_row = M[:, :3, :].mean(dim=1, keepdim=True)                 # [N, 1, 4]
    gain, offset = mean_row[:, :, :3].sum(dim=2, keepdim=True), mean_row[:, :, 3:]
    return pixels * gain + offset


_COLOR_KERNELS = {3: _color_rgb, 1: _color_gray}  # By channel count.


def apply_color(images: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Apply [N, 4, 4] color matrices to RGB images; grayscale images get the luma-averaged effect."""
    N, C, H, W = images.shape
    kernel = _COLOR_KERNELS.get(C)
    if kernel is None:
        raise ValueError(f"color augmentation needs RGB (3 channels) or grayscale (1 channel) images, got {C}")
    return kernel(images.reshape(N, C, H * W), M).reshape(N, C, H, W)


# ----------------------------------------------------------------------------
# Random draws. Every transform takes its numbers from one _Draws, in the order of the tables below; that order
# is the order of torch's random stream, which outputs and labels depend on bit for bit.

class _Draws:
    """Random numbers for one batch of ``n`` images under augmentation probability ``p``."""

    def __init__(self, p: float, n: int, device: torch.device):
        self.p, self.n, self.device = p, n, device

    def bernoulli(self, probability: float, shape: list) -> torch.Tensor:
        return torch.rand(shape, device=self.device) < probability

    def normal(self, shape: list) -> torch.Tensor:
        return torch.randn(shape, device=self.device)

    def integers(self, high: int, shape: list) -> torch.Tensor:
        return torch.randint(high, shape, device=self.device)

    def symmetric(self, shape: list, half_width: float | None = None) -> torch.Tensor:
        """Uniform on [-1, 1), times ``half_width`` if given."""
        u = torch.rand(shape, device=self.device) * 2 - 1
        return u if half_width is None else u * half_width

    def chosen(self, multiplier: float, shape: list) -> torch.Tensor:
        """Which images get a transform: true with probability multiplier * p."""
        return self.bernoulli(multiplier * self.p, shape)

    def gated(self, multiplier: float, values: Callable[[], torch.Tensor], mask_shape: list,
              values_first: bool = False) -> torch.Tensor:
        """``values()`` for the chosen images, 0 (the identity's parameter) for the others. ``values_first``
        says whether the values are drawn before the mask or after it."""
        if values_first:
            drawn = values()
            mask = self.chosen(multiplier, mask_shape)
        else:
            mask = self.chosen(multiplier, mask_shape)
            drawn = values()
        return _keep(mask, drawn)


def _keep(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values))


# ----------------------------------------------------------------------------
# The transforms. Blits take (pipe, draws, multiplier, images) and return (images, label entries); geometric
# transforms take (pipe, draws, multiplier, H, W) and return (inverse [N, 3, 3] matrices, label entries); color
# transforms take (pipe, draws, multiplier) and return ([N, 4, 4] matrices, label entries).

def _flip(draws: _Draws, multiplier: float, images: torch.Tensor, dim: int):
    per_image = [draws.n, 1, 1, 1]
    flipped = draws.gated(multiplier, lambda: draws.integers(2, per_image), per_image)
    return torch.where(flipped == 1, images.flip(dim), images), [flipped]


def _xflip(pipe, draws, multiplier, images):
    return _flip(draws, multiplier, images, dim=3)


def _yflip(pipe, draws, multiplier, images):
    return _flip(draws, multiplier, images, dim=2)


def _rotate_int(pipe, draws, multiplier, images):
    """A uniform number of quarter turns, as an x flip, a y flip and a transpose (in that order)."""
    per_image = [draws.n, 1, 1, 1]
    turns = draws.gated(multiplier, lambda: draws.integers(4, per_image), per_image)
    flip_y = turns >= 2
    transpose = turns % 2 == 1
    flip_x = flip_y ^ transpose
    steps = ((flip_x, lambda x: x.flip(3)), (flip_y, lambda x: x.flip(2)), (transpose, lambda x: x.transpose(2, 3)))
    for mask, step in steps:
        images = torch.where(mask, step(images), images)
    return images, [flip_x, flip_y]


def _translate_int(pipe, draws, multiplier, images):
    """Whole-pixel shift, uniform up to ``translate_int_max`` of the size, per axis; labelled as that fraction."""
    _, _, H, W = images.shape
    shift = draws.gated(multiplier, lambda: draws.symmetric([2, draws.n, 1, 1, 1]), [1, draws.n, 1, 1, 1],
                        values_first=True)
    reach = (W * pipe.translate_int_max, H * pipe.translate_int_max)
    pixels = [(fraction * extent).round().to(torch.int64) for fraction, extent in zip(shift, reach)]
    return _translate_reflect(images, *pixels), [t / extent for t, extent in zip(pixels, reach)]


def _scale(pipe, draws, multiplier, H, W):
    """Isotropic scaling by 2^(scale_std * N(0, 1))."""
    w = draws.gated(multiplier, lambda: draws.normal([draws.n]), [draws.n])
    inverse = 1 / torch.exp2(w * pipe.scale_std)
    return scale2d(inverse, inverse), [w]


def _rotate_frac(pipe, draws, multiplier, H, W):
    """Rotation by a uniform angle in [-pi, pi) * rotate_frac_max; labelled (cos - 1, sin)."""
    angle = draws.gated(multiplier, lambda: draws.symmetric([draws.n], np.pi * pipe.rotate_frac_max), [draws.n],
                        values_first=True)
    return rotate2d(angle), [angle.cos() - 1, angle.sin()]


def _aniso(pipe, draws, multiplier, H, W):
    """Stretch by 2^(aniso_std * N(0, 1)) along an axis that is x, or with probability aniso_rotate_prob a
    uniformly rotated one; labelled w * (cos, sin) of the axis angle."""
    n = draws.n
    mask = draws.chosen(multiplier, [n])
    w = _keep(mask, draws.normal([n]))
    axis = draws.symmetric([n], np.pi)
    axis = _keep(mask & draws.bernoulli(pipe.aniso_rotate_prob, [n]), axis)
    stretch = torch.exp2(w * pipe.aniso_std)
    return rotate2d(-axis) @ scale2d(1 / stretch, stretch) @ rotate2d(axis), [w * axis.cos(), w * axis.sin()]


def _translate_frac(pipe, draws, multiplier, H, W):
    """Shift by N(0, translate_frac_std^2) of the size, per axis."""
    t = draws.gated(multiplier, lambda: draws.normal([2, draws.n]), [1, draws.n], values_first=True)
    return translate2d(-t[0] * (W * pipe.translate_frac_std), -t[1] * (H * pipe.translate_frac_std)), [t[0], t[1]]


def _luma_axis(device) -> torch.Tensor:
    return torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=device) / np.sqrt(3)


def _brightness(pipe, draws, multiplier):
    """Add brightness_std * N(0, 1) to every channel."""
    w = draws.gated(multiplier, lambda: draws.normal([draws.n]), [draws.n])
    return translate3d(w * pipe.brightness_std), [w]


def _contrast(pipe, draws, multiplier):
    """Multiply every channel by 2^(contrast_std * N(0, 1))."""
    w = draws.gated(multiplier, lambda: draws.normal([draws.n]), [draws.n])
    return scale3d(torch.exp2(w * pipe.contrast_std)), [w]


def _lumaflip(pipe, draws, multiplier):
    """With probability 1/2, reflect the color through the plane orthogonal to the luma axis."""
    w = draws.gated(multiplier, lambda: draws.integers(2, [draws.n]).float(), [draws.n])
    luma = _luma_axis(draws.device)
    return torch.eye(4, device=draws.device) - 2 * torch.outer(luma, luma) * w.reshape(draws.n, 1, 1), [w]


def _hue(pipe, draws, multiplier):
    """Rotation about the luma axis by a uniform angle in [-pi, pi) * hue_max; labelled (cos - 1, sin)."""
    angle = draws.gated(multiplier, lambda: draws.symmetric([draws.n], np.pi * pipe.hue_max), [draws.n],
                        values_first=True)
    return rotate3d(_luma_axis(draws.device), angle), [angle.cos() - 1, angle.sin()]


def _saturation(pipe, draws, multiplier):
    """Scale the chroma (the part orthogonal to the luma axis) by 2^(saturation_std * N(0, 1))."""
    w = draws.gated(multiplier, lambda: draws.normal([draws.n]), [draws.n])
    luma = _luma_axis(draws.device)
    along = torch.outer(luma, luma)
    across = torch.eye(4, device=draws.device) - along
    return along + across * torch.exp2(w * pipe.saturation_std).reshape(draws.n, 1, 1), [w]


# name -> (label entries, transform), each table in the constructor's argument order.
_PIXEL_BLITS = {"xflip": (1, _xflip), "yflip": (1, _yflip), "rotate_int": (2, _rotate_int),
                "translate_int": (2, _translate_int)}
_GEOMETRIC = {"scale": (1, _scale), "rotate_frac": (2, _rotate_frac), "aniso": (2, _aniso),
              "translate_frac": (2, _translate_frac)}
_COLOR = {"brightness": (1, _brightness), "contrast": (1, _contrast), "lumaflip": (1, _lumaflip),
          "hue": (2, _hue), "saturation": (1, _saturation)}


# ----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """Random geometric and color transforms; ``pipe(images) -> (images, labels)``.

    ``images``: float [N, C, H, W] (any range; [-1, 1] in training). ``labels``: float32 [N, label_dim].
    Each multiplier (``xflip`` ... ``saturation``) times ``p`` is the probability that an image gets that
    transform; 0 disables it (and its labels). ``p = 0`` leaves images untouched with all-zero labels.
    """

    def __init__(self, p: float = 1,
                 xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0,
                 translate_int_max: float = 0.125,
                 scale: float = 0, rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125,
                 brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0,
                 saturation: float = 0, brightness_std: float = 0.2, contrast_std: float = 0.5, hue_max: float = 1,
                 saturation_std: float = 1):
        self.p = float(p)
        # Pixel blitting (exact): flips, rotations by 90 degrees, integer translations (fraction of size).
        self.xflip, self.yflip, self.rotate_int = float(xflip), float(yflip), float(rotate_int)
        self.translate_int, self.translate_int_max = float(translate_int), float(translate_int_max)
        # General geometry: log2-normal scale, uniform rotation (1 = full circle), log2-normal anisotropy,
        # normal fractional translation (std relative to size).
        self.scale, self.rotate_frac, self.aniso, self.translate_frac = (float(scale), float(rotate_frac),
                                                                          float(aniso), float(translate_frac))
        self.scale_std, self.rotate_frac_max, self.aniso_std = float(scale_std), float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)
        # Color.
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)

    def _enabled(self, table: dict) -> list[tuple[float, Callable]]:
        """(multiplier, transform) for the table's transforms that are switched on, in table order."""
        return [(getattr(self, name), transform) for name, (_, transform) in table.items() if getattr(self, name) > 0]

    @property
    def label_dim(self) -> int:
        """Length of the label vector (9 for the official configs)."""
        return sum(entries for table in (_PIXEL_BLITS, _GEOMETRIC, _COLOR)
                   for name, (entries, _) in table.items() if getattr(self, name) > 0)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        draws = _Draws(self.p, N, images.device)
        labels: list[torch.Tensor] = []
        for multiplier, blit in self._enabled(_PIXEL_BLITS):
            images, entries = blit(self, draws, multiplier, images)
            labels += entries
        # Inverse geometric matrices compose with later transforms on the right, color ones on the left.
        G_inv = self._product(_GEOMETRIC, lambda t, m: t(self, draws, m, H, W), labels, later_on_right=True)
        if G_inv is not None:
            images = _apply_where_not_identity(apply_geometric, images, G_inv)
        M = self._product(_COLOR, lambda t, m: t(self, draws, m), labels, later_on_right=False)
        if M is not None:
            images = _apply_where_not_identity(apply_color, images, M)
        if not labels:
            return images, torch.zeros([N, 0], device=images.device)
        return images, torch.cat([entry.to(torch.float32).reshape(N, -1) for entry in labels], dim=1)

    def _product(self, table: dict, run: Callable, labels: list,
                 later_on_right: bool) -> torch.Tensor | None:
        """The product of the enabled transforms' matrices (None if none is enabled); their label entries are
        appended to ``labels``."""
        product = None
        for multiplier, transform in self._enabled(table):
            matrix, entries = run(transform, multiplier)
            labels += entries
            if product is None:
                product = matrix
            else:
                product = product @ matrix if later_on_right else matrix @ product
        return product


def _apply_where_not_identity(apply, images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Transform only the images whose matrix is not the identity; the others stay bit-exact."""
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    moved = (matrices != eye).flatten(1).any(dim=1)
    if not bool(moved.any()):
        return images
    images = images.clone()
    images[moved] = apply(images[moved], matrices[moved]).to(images.dtype)
    return images


def _translate_reflect(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer (tx, ty) pixels ([N, 1, 1, 1] each), filling in by mirror reflection."""
    N, C, H, W = images.shape
    x = torch.arange(W, device=images.device).reshape(1, 1, 1, W) - tx
    y = torch.arange(H, device=images.device).reshape(1, 1, H, 1) - ty
    x = (W - 1) - ((W - 1) - x % (2 * W - 2)).abs()  # Reflect without repeating the edge pixel.
    y = (H - 1) - ((H - 1) - y % (2 * H - 2)).abs()
    rows = images.gather(2, y.expand(N, C, H, W).clone())
    return rows.gather(3, x.expand(N, C, H, W).clone())
