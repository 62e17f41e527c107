"""Reference statistics files (``fid-refs/*.npz``) and their cache.

The official format is ``numpy.savez`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), float64, so the
official files (e.g. https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz) are read as they
are, and files we write are read by the official code. We may add ``features`` (N, 2048) float32, which
KID needs; readers of the official format ignore it.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from dnnlib import util
from metrics.inception import FEATURE_DIM


class ReferenceFileError(ValueError):
    """A reference file that is missing, unreadable or of the wrong shape."""


def load_reference(path_or_url: str) -> dict[str, np.ndarray]:
    """Read and check a reference file (path or URL; URLs are cached). Returns ``mu``, ``sigma`` [, ``features``]."""
    try:
        with util.open_url(path_or_url) as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            ref = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ReferenceFileError(f"{path_or_url}: cannot read reference statistics ({e})") from e
    check_reference(ref, path_or_url)
    return ref


def check_reference(ref: dict[str, np.ndarray], source: str) -> None:
    expected = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM)}
    for key, shape in expected.items():
        if key not in ref:
            raise ReferenceFileError(f"{source}: lacks '{key}'; a reference file holds 'mu' and 'sigma' (fid.py ref)")
        if ref[key].shape != shape:
            raise ReferenceFileError(f"{source}: '{key}' has shape {list(ref[key].shape)}, expected {list(shape)} "
                                 "(pool3 features of the FID Inception)")
        if not np.isfinite(ref[key]).all():
            raise ReferenceFileError(f"{source}: '{key}' holds non-finite values")
    if "features" in ref and (ref["features"].ndim != 2 or ref["features"].shape[1] != FEATURE_DIM):
        raise ReferenceFileError(f"{source}: 'features' has shape {list(ref['features'].shape)}, expected [N, {FEATURE_DIM}]")


def save_reference(path: str, ref: dict[str, np.ndarray]) -> None:
    """Write a reference file atomically (a reader never sees half a file)."""
    check_reference(ref, path)
    buffer = io.BytesIO()
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
