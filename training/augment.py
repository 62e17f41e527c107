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


def apply_color(images: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Apply [N, 4, 4] color matrices to RGB images; grayscale images get the luma-averaged effect."""
    N, C, H, W = images.shape
    flat = images.reshape(N, C, H * W)
    if C == 3:
        flat = M[:, :3, :3] @ flat + M[:, :3, 3:]
    elif C == 1:
        M = M[:, :3, :].mean(dim=1, keepdim=True)
        flat = flat * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
    else:
        raise ValueError(f"color augmentation needs RGB (3 channels) or grayscale (1 channel) images, got {C}")
    return flat.reshape(N, C, H, W)


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

    @property
    def label_dim(self) -> int:
        """Length of the label vector (9 for the official configs)."""
        sizes = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                     translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
        return sum(size for name, size in sizes.items() if getattr(self, name) > 0)

    def _chosen(self, multiplier: float, shape, device) -> torch.Tensor:
        """Which images get a transform: a boolean mask, true with probability multiplier * p."""
        return torch.rand(shape, device=device) < multiplier * self.p

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        labels: list[torch.Tensor] = []
        images = self._blit(images, labels)
        G_inv = self._geometry(N, H, W, images.device, labels)
        if G_inv is not None:
            images = _apply_where_not_identity(apply_geometric, images, G_inv)
        M = self._color(N, images.device, labels)
        if M is not None:
            images = _apply_where_not_identity(apply_color, images, M)
        labels = [v.to(torch.float32).reshape(N, -1) for v in labels]
        return images, torch.cat(labels, dim=1) if labels else torch.zeros([N, 0], device=images.device)

    def _blit(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        """Exact pixel moves: x/y flips, 90-degree rotations, integer translations with reflection."""
        N, C, H, W = images.shape
        dev = images.device
        shape = [N, 1, 1, 1]
        zero = torch.zeros(shape, dtype=torch.int64, device=dev)
        if self.xflip > 0:
            w = torch.where(self._chosen(self.xflip, shape, dev), torch.randint(2, shape, device=dev), zero)
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = torch.where(self._chosen(self.yflip, shape, dev), torch.randint(2, shape, device=dev), zero)
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            w = torch.where(self._chosen(self.rotate_int, shape, dev), torch.randint(4, shape, device=dev), zero)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=dev) * 2 - 1
            w = torch.where(self._chosen(self.translate_int, [1, N, 1, 1, 1], dev), w, torch.zeros_like(w))
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            images = _translate_reflect(images, tx, ty)
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]
        return images

    def _geometry(self, N: int, H: int, W: int, dev, labels: list) -> torch.Tensor | None:
        """The product of the inverse transforms, [N, 3, 3], or None when no geometric transform is on."""
        G_inv = None

        def then(M_inv):
            nonlocal G_inv
            G_inv = M_inv if G_inv is None else G_inv @ M_inv

        zeros = torch.zeros([N], device=dev)
        if self.scale > 0:
            w = torch.where(self._chosen(self.scale, [N], dev), torch.randn([N], device=dev), zeros)
            s = torch.exp2(w * self.scale_std)
            then(scale2d(1 / s, 1 / s))
            labels.append(w)
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = torch.where(self._chosen(self.rotate_frac, [N], dev), w, zeros)
            then(rotate2d(w))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            chosen = self._chosen(self.aniso, [N], dev)
            w = torch.where(chosen, torch.randn([N], device=dev), zeros)
            r = (torch.rand([N], device=dev) * 2 - 1) * np.pi
            r = torch.where(chosen & (torch.rand([N], device=dev) < self.aniso_rotate_prob), r, zeros)
            s = torch.exp2(w * self.aniso_std)
            then(rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r))
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = torch.randn([2, N], device=dev)
            w = torch.where(self._chosen(self.translate_frac, [1, N], dev), w, torch.zeros_like(w))
            then(translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std)))
            labels += [w[0], w[1]]
        return G_inv

    def _color(self, N: int, dev, labels: list) -> torch.Tensor | None:
        """The product of the color transforms, [N, 4, 4], or None when no color transform is on."""
        M = None

        def then(T):
            nonlocal M
            M = T if M is None else T @ M

        zeros = torch.zeros([N], device=dev)
        luma = torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=dev) / np.sqrt(3)
        luma_outer = torch.outer(luma, luma)
        eye = torch.eye(4, device=dev)
        if self.brightness > 0:
            w = torch.where(self._chosen(self.brightness, [N], dev), torch.randn([N], device=dev), zeros)
            then(translate3d(w * self.brightness_std))
            labels.append(w)
        if self.contrast > 0:
            w = torch.where(self._chosen(self.contrast, [N], dev), torch.randn([N], device=dev), zeros)
            then(scale3d(torch.exp2(w * self.contrast_std)))
            labels.append(w)
        if self.lumaflip > 0:
            w = torch.where(self._chosen(self.lumaflip, [N], dev), torch.randint(2, [N], device=dev).float(), zeros)
            then(eye - 2 * luma_outer * w.reshape(N, 1, 1))
            labels.append(w)
        if self.hue > 0:
            w = (torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.hue_max)
            w = torch.where(self._chosen(self.hue, [N], dev), w, zeros)
            then(rotate3d(luma, w))
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = torch.where(self._chosen(self.saturation, [N], dev), torch.randn([N], device=dev), zeros)
            then(luma_outer + (eye - luma_outer) * torch.exp2(w * self.saturation_std).reshape(N, 1, 1))
            labels.append(w)
        return M


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
