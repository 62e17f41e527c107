"""Network snapshots: the one writer (and, with the loader, the one reader) of ``*.pkl`` network files.

A snapshot is a pickle (protocol 4) of a dict ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``
in the official EDM format (see torch_utils/persistence.py), so official tools and users' scripts read it.
``load_network_pkl`` / ``load_network`` read ours, the official release's and safetensors exports, safely.
"""

from __future__ import annotations

import builtins
import codecs
import io
import json
import os
import pickle
import re
import warnings
from typing import Any, BinaryIO, Callable

import torch

import dnnlib
from dnnlib.util import atomic_write_bytes
from torch_utils import persistence


def save_network_pkl(path: str, data: dict[str, Any]) -> None:
    """Write a snapshot dict (``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``) atomically."""
    missing = {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"} - set(data)
    if missing:
        raise ValueError(f"snapshot for {path} lacks {', '.join(sorted(missing))}")
    atomic_write_bytes(path, pickle.dumps(data, protocol=4))


# ----------------------------------------------------------------------------
# The loader: our snapshots, official pickles and safetensors exports, from a path or a URL.
#
# A pickle is untrusted input: unpickling may call any global it names. This unpickler resolves only the
# globals that network snapshots need (below); anything else is refused before it can run. Persistent
# objects are rebuilt as our own classes (torch_utils/persistence.py); their embedded ``module_src`` is
# never executed.


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to run something a network snapshot has no business running."""


class UnresolvedObject:
    """Stand-in for an auxiliary object of a snapshot (a loss or augmentation pipe, never the network) that
    cannot be rebuilt as one of our classes; using it raises an error that says why."""

    def __init__(self, class_name: str, init_args: tuple, init_kwargs: dict, reason: str):
        self.class_name, self.init_args, self.init_kwargs, self.reason = class_name, init_args, init_kwargs, reason

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"the snapshot's {self.class_name} could not be rebuilt: {self.reason}")

    def __repr__(self) -> str:
        return f"UnresolvedObject({self.class_name!r}, reason={self.reason!r})"


def _rebuild_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object as our class; non-module objects we cannot rebuild become UnresolvedObject,
    so that a network still loads when, say, its snapshot's augmentation pipe has options we lack."""
    try:
        return persistence._reconstruct_persistent_obj(meta)
    except (pickle.UnpicklingError, TypeError, ValueError) as e:
        state = meta.get("state") if isinstance(meta, dict) else None
        if not isinstance(state, dict) or "_parameters" in state or "_modules" in state:
            raise
        return UnresolvedObject(str(meta.get("class_name")), tuple(state.get("_init_args", ())),
                                dict(state.get("_init_kwargs", {})), str(e).splitlines()[0])


def _load_storage_from_bytes(data: bytes) -> Any:
    """A tensor storage pickled as ``torch.save`` bytes, read with torch's weights-only unpickler (the stock
    ``torch.storage._load_from_bytes`` would unpickle those bytes with no restriction)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("malformed tensor storage: expected bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation: the format is what it is.
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"a tensor storage holds more than tensor data: {str(e).splitlines()[0]}") from None


def _numpy_scalar_constructor() -> Callable:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


def _reconstruct_ndarray(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's unpickling constructor of arrays (an empty array that the pickle then fills with its data), for
    plain ``numpy.ndarray`` only. Official EDM2 snapshots need it: their latent encoder keeps its scale and bias
    as float32 arrays."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to load: a numpy array of type {subtype!r}, not numpy.ndarray")
    return _reconstruct(subtype, shape, dtype)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import collections

    import numpy as np

    import dnnlib

    scalar = _numpy_scalar_constructor()
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _rebuild_persistent_obj,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("torch.nn.modules.container", "ModuleDict"): torch.nn.ModuleDict,
        ("torch.nn.modules.container", "ModuleList"): torch.nn.ModuleList,
        ("torch.nn.modules.container", "Sequential"): torch.nn.Sequential,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("dnnlib", "EasyDict"): dnnlib.EasyDict,
        ("dnnlib.util", "EasyDict"): dnnlib.EasyDict,
    }
    allowed[("_codecs", "encode")] = codecs.encode  # bytes in protocol 2 pickles
    for name in ("set", "frozenset", "complex", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals network snapshots need, and refuses all others."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        if (module, name) not in SafeUnpickler._allowed:
            raise UnsafePickleError(f"refusing to load: the pickle references '{module}.{name}', which a network "
                                    f"snapshot never needs (nothing was run)")
        return SafeUnpickler._allowed[(module, name)]


def safe_unpickle(file: BinaryIO) -> Any:
    """``pickle.load`` restricted to what network snapshots need; see :class:`SafeUnpickler`."""
    return SafeUnpickler(file).load()


SNAPSHOT_KEYS = ("ema", "loss_fn", "augment_pipe", "dataset_kwargs")
_SAFETENSORS_KEY = "edm_network"


def _file_kind(head: bytes) -> str:
    if head[:1] == b"\x80":
        return "pickle"
    if head[:2] == b"PK":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header.
        return "safetensors"
    return "unknown"


PRETRAINED_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_PRETRAINED_NAME = re.compile(r"(?:baseline/)?(?:edm|baseline)-[a-z0-9]+-\d+x\d+-(?:cond|uncond)-(?:vp|ve|adm)\.pkl")


def resolve_network_path(path_or_url: str) -> str:
    """A local file or URL as given; the bare name of an official pretrained network that is not a local file
    (``edm-cifar10-32x32-cond-vp.pkl``, ``baseline-cifar10-32x32-uncond-vp.pkl``) as its official URL."""
    if os.path.exists(path_or_url) or dnnlib.util.is_url(path_or_url) or not _PRETRAINED_NAME.fullmatch(path_or_url):
        return path_or_url
    name = path_or_url
    if name.startswith("baseline-"):
        name = f"baseline/{name}"
    return PRETRAINED_URL + name


def load_network_pkl(path_or_url: str, device: torch.device | str | None = None) -> dict:
    """Load a snapshot dict ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}`` from a network pickle
    (ours or the official release's) or a safetensors export, given a path, an http(s) URL (downloaded
    once to a cache, see ``dnnlib.util.open_url``) or the bare name of an official pretrained network. Modules
    are moved to ``device`` (default: left on the CPU).

    Safe by design: nothing in the file is executed (see :class:`SafeUnpickler`).
    """
    filename = dnnlib.util.open_url(resolve_network_path(path_or_url), return_filename=True)
    with open(filename, "rb") as f:
        kind = _file_kind(f.read(16))
        f.seek(0)
        if kind == "pickle":
            try:
                data = safe_unpickle(f)
            except UnsafePickleError as e:
                raise UnsafePickleError(f"{path_or_url}: {e}") from None
            except (pickle.UnpicklingError, EOFError) as e:
                raise pickle.UnpicklingError(f"{path_or_url}: not a readable network pickle: {e}") from None
        elif kind == "safetensors":
            data = _load_safetensors(filename)
        elif kind == "zip":
            raise ValueError(f"{path_or_url}: this is a torch.save archive (e.g. training-state-*.pt), not a network "
                             f"snapshot; pass a network-snapshot-*.pkl or a .safetensors export")
        else:
            raise ValueError(f"{path_or_url}: not a network pickle or safetensors file")
    if isinstance(data, torch.nn.Module):  # A bare pickled network.
        data = dict(ema=data, loss_fn=None, augment_pipe=None, dataset_kwargs=None)
    if not isinstance(data, dict) or not isinstance(data.get("ema"), torch.nn.Module):
        raise ValueError(f"{path_or_url}: expected a snapshot dict holding the network under 'ema'")
    data = {key: data.get(key) for key in SNAPSHOT_KEYS} | {k: v for k, v in data.items() if k not in SNAPSHOT_KEYS}
    if device is not None:
        data = {key: value.to(device) if isinstance(value, torch.nn.Module) else value for key, value in data.items()}
    return data


def load_network(path_or_url: str, device: torch.device | str | None = None) -> torch.nn.Module:
    """The network to sample from (the snapshot's 'ema'), in eval mode, on ``device`` (default: the CPU)."""
    return load_network_pkl(path_or_url, device=device)["ema"].eval()


def is_latent_snapshot(snapshot: dict) -> bool:
    """Whether a loaded snapshot's network works on latents rather than pixels: an official EDM2 latent model
    (img512 presets), whose ``encoder`` is the Stable Diffusion VAE (``StabilityVAEEncoder``). Snapshots
    without an encoder (EDM, ours) and those with ``StandardRGBEncoder`` work on pixels."""
    encoder = snapshot.get("encoder")
    if encoder is None:
        return False
    name = encoder.class_name if isinstance(encoder, UnresolvedObject) else type(encoder).__name__
    return name != "StandardRGBEncoder"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy and 0-d torch scalars
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def export_safetensors(net: torch.nn.Module, path: str, dataset_kwargs: dict | None = None) -> None:
    """Write ``net`` as a plain state_dict in safetensors format, with its class name and constructor call as
    JSON in the file's metadata (key 'edm_network'), so that ``load_network`` rebuilds it without pickle."""
    from safetensors.torch import save

    if not persistence.is_persistent(net):
        raise ValueError(f"{type(net).__name__} is not one of our persistent network classes; cannot record its config")
    config = dict(class_name=type(net).__name__, init_args=list(net.__dict__.get("_init_args", ())),
                  init_kwargs=persistence.init_kwargs_of(net), dataset_kwargs=dataset_kwargs)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in net.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={_SAFETENSORS_KEY: json.dumps(config, default=_json_default)}))


def _load_safetensors(filename: str) -> dict:
    from safetensors import safe_open

    with safe_open(filename, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if _SAFETENSORS_KEY not in metadata:
            raise ValueError(f"{filename}: safetensors file without an '{_SAFETENSORS_KEY}' config; "
                             f"write it with training.checkpoint.export_safetensors")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    config = json.loads(metadata[_SAFETENSORS_KEY])
    cls = persistence.registered_class(str(config["class_name"]))
    with torch.device("meta"):
        net = cls(*config.get("init_args", ()), **config.get("init_kwargs", {}))
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{filename}: tensors do not match {cls.__name__}'s config: "
                         f"{str(e).strip().splitlines()[0]}") from None
    return dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs=config.get("dataset_kwargs"))
