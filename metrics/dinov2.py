"""The FD-DINOv2 detector of EDM2 (Karras et al. 2024, Section 5): the CLS token of DINOv2 ViT-L/14.

EDM2 reports, beside FID, the Fréchet distance between features of this network (Stein et al. 2023's
FD-DINOv2): uint8 RGB images resized to 224x224 (bicubic, antialiased, on float values with no rounding),
scaled to [0, 1] and normalized with the ImageNet mean and std; the features are the class token after the
final layer norm, 1024-d.

The network is timm's ``vit_large_patch14_dinov2`` (the same layers and parameter names as DINOv2's own
``dinov2_vitl14``), built at 224x224 and given the official release checkpoint's weights. DINOv2 was trained
at 518x518 (a 37x37 patch grid) and resizes its position embedding to the 16x16 grid of a 224x224 input at
run time; :func:`interpolated_pos_embed` computes what that resizing gives, once, when the weights are loaded.
timm is an optional dependency, imported only here and only when FD-DINOv2 is asked for.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib import util
from metrics.detector import DetectorError, load_state_dict_file, weights_checksum

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
INPUT_SIZE = 224
FEATURE_DIM = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_OFFSET = 0.1  # DINOv2's ``interpolate_offset``: added to the patch grid size in the scale factor.

# The network as timm's model name and the overrides of its defaults. The tests swap in a smaller one of the
# same class; everything else (checkpoint names, position embedding, preprocessing) stays on the same path.
ARCHITECTURE: dict = dict(model_name="vit_large_patch14_dinov2")

TIMM_MISSING = "fd_dinov2 needs the timm package: pip install -r requirements-extras.txt"


def require_timm():
    """The timm module, or a DetectorError with one line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise DetectorError(TIMM_MISSING) from None
    return timm


# ----------------------------------------------------------------------------
# Preprocessing and the position embedding.

def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8-valued images [N, C, H, W] in [0, 255] (C = 1 or 3) -> DINOv2 input [N, 3, 224, 224] float32.

    EDM2's DINOv2 detector: bicubic resize with antialiasing (``F.interpolate``, as float, not rounded or
    clamped), ``x / 255``, then ``(x - mean) / std`` with ImageNet's statistics. Grayscale is repeated to RGB,
    as for the Inception.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {list(images.shape)}")
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat([1, 3, 1, 1])
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x / 255 - mean) / std


def interpolated_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """DINOv2's position embedding [1, 1 + M^2, D] for a ``grid_size`` x ``grid_size`` patch grid, as its
    ``interpolate_pos_encoding`` computes it at run time: [1, 1 + grid_size^2, D] float32.

    The class token's entry is kept; the M x M grid is resized by bicubic interpolation (a = -0.75, borders
    clamped, no antialiasing) given the scale factor (grid_size + 0.1) / M rather than the output size, so
    output cell i samples the source at (i + 0.5) M / (grid_size + 0.1) - 0.5. A grid already of the size is
    used as it is.
    """
    num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    m = math.isqrt(num_patches)
    if m * m != num_patches:
        raise ValueError(f"the position embedding has {num_patches} patch entries, not a square grid")
    if m == grid_size:
        return pos_embed.to(torch.float32)
    pos_embed = pos_embed.to(torch.float32)
    grid = pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid_size + POS_EMBED_OFFSET) / m
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)], dim=1)


# ----------------------------------------------------------------------------
# The network and its weights.

def build_vit(architecture: dict | None = None) -> nn.Module:
    """timm's DINOv2 ViT at 224x224 without a head, its parameters unallocated (they come from a checkpoint)."""
    timm = require_timm()
    kwargs = dict(architecture or ARCHITECTURE)
    name = kwargs.pop("model_name")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, img_size=INPUT_SIZE, num_classes=0, **kwargs)


def from_official(state_dict: dict[str, torch.Tensor], vit: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """DINOv2's release checkpoint -> the state dict of ``vit``, checked: the names are the same; the mask token
    (used only in training) is dropped; the position embedding is resized to the 224x224 input's grid."""
    expected = {name: tuple(value.shape) for name, value in vit.state_dict().items()}
    converted = {name: value for name, value in state_dict.items() if name != "mask_token"}
    missing = sorted(set(expected) - set(converted), key=lambda name: (name != "cls_token", name))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has unexpected '{extra[0]}'"
        raise DetectorError(f"{source}: {what}; not a DINOv2 checkpoint of {_describe(expected)}")
    pos_embed = converted["pos_embed"]
    if not _is_square_grid_embedding(pos_embed, width=expected["pos_embed"][2]):
        raise DetectorError(f"{source}: 'pos_embed' has shape {list(pos_embed.shape)}, expected [1, 1 + M^2, "
                            f"{expected['pos_embed'][2]}]")
    grid_size = INPUT_SIZE // vit.patch_embed.patch_size[0]
    converted["pos_embed"] = interpolated_pos_embed(pos_embed, grid_size)
    for name, shape in expected.items():
        if tuple(converted[name].shape) != shape:
            raise DetectorError(f"{source}: '{name}' has shape {list(converted[name].shape)}, expected "
                                f"{list(shape)} ({_describe(expected)})")
    return {name: value.to(torch.float32) for name, value in converted.items()}


def _is_square_grid_embedding(pos_embed: torch.Tensor, width: int) -> bool:
    """[1, 1 + M^2, width]: a class token's entry and an M x M grid's."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] < 2 or pos_embed.shape[2] != width:
        return False
    return math.isqrt(pos_embed.shape[1] - 1) ** 2 == pos_embed.shape[1] - 1


def _describe(expected: dict[str, tuple]) -> str:
    depth = len({name.split(".")[1] for name in expected if name.startswith("blocks.")})
    patch = expected["patch_embed.proj.weight"][-1]
    return f"a ViT/{patch} of width {expected['cls_token'][-1]} and depth {depth}"


def load_dinov2_weights(source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a DINOv2 checkpoint: a path, or a URL (cached); default: the official ViT-L/14 release."""
    source = source or DINOV2_URL
    try:
        path = util.open_url(source, return_filename=True, verbose=True) if util.is_url(source) else source
    except (OSError, ValueError) as e:
        raise DetectorError(f"{source}: cannot fetch the DINOv2 weights ({e})") from e
    if not os.path.isfile(path):
        raise DetectorError(f"{source}: no such file; pass --dinov2=PATH|URL of {os.path.basename(DINOV2_URL)}")
    return load_state_dict_file(path)


class DINOv2Detector(nn.Module):
    """Images (uint8 values, [N, C, H, W]) -> DINOv2 features [N, 1024] float32: :func:`preprocess`, the ViT,
    the class token after the final norm (DINOv2's ``x_norm_clstoken``, its hub model's output)."""

    name = "dinov2"
    preprocess_mode = "bicubic-antialias-224-imagenet"

    def __init__(self, vit: nn.Module, weights_sha256: str = ""):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.feature_dim = vit.num_features
        self.weights_sha256 = weights_sha256  # Identifies the weights in cache keys.

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images)
        with _ieee_float32_matmuls(x.device):
            tokens = self.vit.forward_features(x)  # [N, 1 + patches, D], after the final norm.
        return tokens[:, 0].to(torch.float32)


def load_dinov2_detector(source: str | None = None, device: torch.device | str = "cpu",
                         architecture: dict | None = None) -> DINOv2Detector:
    """The FD-DINOv2 detector with the weights of ``source`` (see :func:`load_dinov2_weights`) on ``device``.

    The checkpoint's names and shapes must be those of ``architecture`` (default :data:`ARCHITECTURE`, ViT-L/14).
    """
    vit = build_vit(architecture)
    state_dict = from_official(load_dinov2_weights(source), vit, source or DINOV2_URL)
    vit.load_state_dict(state_dict, assign=True)
    return DINOv2Detector(vit, weights_sha256=weights_checksum(state_dict)).to(device)


@contextlib.contextmanager
def _ieee_float32_matmuls(device: torch.device):
    """CUDA matmuls in true float32, not TF32 (which a run's --tf32 turns on for training); restores the setting."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda" or not hasattr(matmul, "fp32_precision"):
        yield
        return
    saved = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved
