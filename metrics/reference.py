"""Reference statistics files (``fid-refs/*.npz``, EDM2's ``dataset-refs/*.pkl``) and their cache.

EDM's official format is ``numpy.savez`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), float64, so the
official files (e.g. https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz) are read as they
are, and files we write are read by the official code. We may add ``features`` (N, 2048) float32, which
KID needs, and the statistics of other detectors under their prefix: ``fd_dinov2_mu`` (1024,),
``fd_dinov2_sigma`` (1024, 1024) [, ``fd_dinov2_features``] for FD-DINOv2. Readers of the official format
ignore the keys they do not know; a file made for FD-DINOv2 alone has no ``mu``, and is not an FID reference.

EDM2's format is a pickle of ``{'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}, 'num_images': N}``
(e.g. https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl). It is read without running code: the
unpickler builds dicts, numbers and numpy arrays and refuses every other global. A ``.pkl`` destination is
written in that format.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass

import numpy as np

from dnnlib import util
from metrics import dinov2, inception


class ReferenceFileError(ValueError):
    """A reference file that is missing, unreadable or of the wrong shape."""


@dataclass(frozen=True)
class StatisticsLayout:
    """Where one detector's statistics are in a reference: key prefix in ours, key in EDM2's, feature size."""

    prefix: str
    edm2_key: str
    feature_dim: int
    features: str  # What the features are, for error messages.

    def key(self, what: str) -> str:
        """'mu', 'sigma' or 'features' -> the key in our files."""
        return self.prefix + what


LAYOUTS = {
    "inception": StatisticsLayout("", "fid", inception.FEATURE_DIM, "pool3 features of the FID Inception"),
    "dinov2": StatisticsLayout("fd_dinov2_", "fd_dinov2", dinov2.FEATURE_DIM, "class tokens of DINOv2 ViT-L/14"),
}
STATISTICS = ("mu", "sigma", "features")


def detectors_in(ref: dict[str, np.ndarray]) -> list[str]:
    """The detectors whose statistics ``ref`` holds."""
    return [name for name, layout in LAYOUTS.items() if layout.key("mu") in ref or layout.key("sigma") in ref]


def is_statistics_file(path: str) -> bool:
    """A URL or a ``.npz``/``.pkl`` file names statistics; anything else a dataset."""
    return util.is_url(path) or path.lower().endswith((".npz", ".pkl"))


def load_reference(path_or_url: str) -> dict[str, np.ndarray]:
    """Read and check a reference file, ours (.npz) or EDM2's (.pkl); path or URL (URLs are cached). Returns
    the statistics in our layout: ``mu``, ``sigma`` [, ``features``], ``fd_dinov2_mu``, ... (see LAYOUTS)."""
    try:
        with util.open_url(path_or_url) as f:
            data = f.read()
        is_pickle = data[:1] == b"\x80"
        contents = _StatisticsUnpickler(io.BytesIO(data)).load() if is_pickle else _npz_arrays(data)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError, KeyError, IndexError) as e:
        raise ReferenceFileError(f"{path_or_url}: cannot read reference statistics ({e})") from e
    ref = from_edm2_statistics(contents, path_or_url) if is_pickle else contents
    check_reference(ref, path_or_url)
    return ref


def _npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def check_reference(ref: dict[str, np.ndarray], source: str) -> None:
    """Raise ReferenceFileError unless ``ref`` holds ``mu`` and ``sigma`` of at least one detector, every one
    of the right shape and finite (and ``features``, where present, [N, D])."""
    present = detectors_in(ref)
    if not present:
        raise ReferenceFileError(f"{source}: lacks 'mu'; a reference file holds 'mu' and 'sigma' (fid.py ref)")
    for name in present:
        layout = LAYOUTS[name]
        dim = layout.feature_dim
        for what, shape in (("mu", (dim,)), ("sigma", (dim, dim))):
            key = layout.key(what)
            if key not in ref:
                raise ReferenceFileError(f"{source}: lacks '{key}'; a reference holds both '{layout.key('mu')}' and "
                                         f"'{layout.key('sigma')}'")
            if ref[key].shape != shape:
                raise ReferenceFileError(f"{source}: '{key}' has shape {list(ref[key].shape)}, expected {list(shape)} "
                                         f"({layout.features})")
            if not np.isfinite(ref[key]).all():
                raise ReferenceFileError(f"{source}: '{key}' holds non-finite values")
        features = ref.get(layout.key("features"))
        if features is not None and (features.ndim != 2 or features.shape[1] != dim):
            raise ReferenceFileError(f"{source}: '{layout.key('features')}' has shape {list(features.shape)}, "
                                     f"expected [N, {dim}]")


def from_edm2_statistics(data, source: str) -> dict[str, np.ndarray]:
    """EDM2's ``{'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}, ...}`` -> our layout; other metrics' entries and
    ``num_images`` are left out."""
    if not isinstance(data, dict):
        raise ReferenceFileError(f"{source}: holds a {type(data).__name__}, not reference statistics (a dict)")
    ref = {}
    for layout in LAYOUTS.values():
        stats = data.get(layout.edm2_key)
        if stats is None:
            continue
        if not isinstance(stats, dict):
            raise ReferenceFileError(f"{source}: '{layout.edm2_key}' holds a {type(stats).__name__}, not statistics")
        ref.update({layout.key(what): np.asarray(stats[what]) for what in STATISTICS if what in stats})
    return ref


def to_edm2_statistics(ref: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Our layout -> EDM2's (``features`` go along inside each metric's entry; EDM2's code ignores them)."""
    return {LAYOUTS[name].edm2_key: {what: ref[LAYOUTS[name].key(what)] for what in STATISTICS
                                     if LAYOUTS[name].key(what) in ref} for name in detectors_in(ref)}


def _numpy_array_globals() -> dict[tuple[str, str], object]:
    """The globals that pickles of numpy arrays name (numpy 1 and 2 module names, pickle protocols 2 to 5)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    import codecs
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # Protocol 2 stores an array's bytes as text to encode.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _StatisticsUnpickler(pickle.Unpickler):
    """Unpickles dicts, numbers and numpy arrays; refuses every other global, so nothing in the file runs."""

    def find_class(self, module: str, name: str):
        allowed = _numpy_array_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load: the pickle references '{module}.{name}', which "
                                         f"reference statistics never need (nothing was run)")
        return allowed[(module, name)]


def save_reference(path: str, ref: dict[str, np.ndarray]) -> None:
    """Write a reference file atomically (a reader never sees half a file): EDM2's pickle for a ``.pkl`` path,
    else ours (``numpy.savez``)."""
    check_reference(ref, path)
    buffer = io.BytesIO()
    if path.lower().endswith(".pkl"):
        pickle.dump(to_edm2_statistics(ref), buffer, protocol=4)
    else:
        np.savez(buffer, **ref)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's relative file names and bytes (in name order)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(root, name), path)
                       for root, _dirs, names in os.walk(path) for name in names)
    else:
        files = [None]
    for rel in files:
        if rel is not None:
            digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(path if rel is None else os.path.join(path, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def reference_cache_path(data_path: str, *settings: str) -> str:
    """Where the statistics of a dataset are cached: keyed by its content and the settings that shape them."""
    key = hashlib.sha256("\0".join([content_hash(data_path), *settings]).encode()).hexdigest()
    return util.make_cache_dir_path("fid-refs", f"{key[:32]}.npz")
