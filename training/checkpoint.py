"""Network snapshots: the one writer (and, with the loader, the one reader) of ``*.pkl`` network files.

A snapshot is a pickle (protocol 4) of a dict ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``
in the official EDM format (see torch_utils/persistence.py), so official tools and users' scripts read it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file so that readers see either the old file or the complete new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_network_pkl(path: str, data: dict[str, Any]) -> None:
    """Write a snapshot dict (``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``) atomically."""
    missing = {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"} - set(data)
    if missing:
        raise ValueError(f"snapshot for {path} lacks {', '.join(sorted(missing))}")
    atomic_write_bytes(path, pickle.dumps(data, protocol=4))
