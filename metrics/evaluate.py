"""Metrics of a set of features against a reference: what ``fid.py``, the training loop and users' scripts call."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from torch_utils import distributed as dist
from metrics.frechet import feature_statistics, frechet_distance, kernel_inception_distance
from metrics.reference import load_reference, reference_cache_path, save_reference

METRICS = ("fid", "kid")


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """'fid,kid' -> ['fid', 'kid'], checked against :data:`METRICS`."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric '{unknown[0] if unknown else text}'; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def reference_from_features(features: np.ndarray, keep_features: bool = False) -> dict[str, np.ndarray]:
    """Reference statistics in the official format (``mu``, ``sigma``), with ``features`` too if asked (for KID)."""
    mu, sigma = feature_statistics(features)
    ref = {"mu": mu, "sigma": sigma}
    if keep_features:
        ref["features"] = np.asarray(features, dtype=np.float32)
    return ref


def compute_metrics(features: np.ndarray, ref: dict[str, np.ndarray], metrics: Sequence[str] = ("fid",),
                    kid_seed: int = 0) -> dict[str, float]:
    """Each requested metric of ``features`` [N, 2048] against ``ref`` (``mu``, ``sigma`` [, ``features``])."""
    results = {}
    for name in parse_metrics(metrics):
        if name == "fid":
            mu, sigma = feature_statistics(features)
            results["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        elif name == "kid":
            if "features" not in ref:
                raise ValueError("KID needs the reference's features, which this reference file lacks; pass the "
                                 "dataset itself as the reference, or make the file with `fid.py ref --features`")
            results["kid"] = kernel_inception_distance(features, ref["features"], seed=kid_seed)
    return results


def detector_settings(detector) -> list[str]:
    """What, besides the images, shapes a detector's features: its weights and its preprocessing."""
    return [f"weights={detector.weights_sha256}", f"preprocess={detector.preprocess_mode}"]


def cached_dataset_reference(data_path: str, compute_features: Callable[[], np.ndarray], settings: Sequence[str],
                             keep_features: bool = False, cache: bool = True) -> dict[str, np.ndarray]:
    """Reference statistics of a dataset, cached by the dataset's content hash and ``settings``.

    ``settings`` must name everything else that shapes the features (detector weights, preprocessing,
    subset). Every process calls this; all compute, the main process writes the cache.
    """
    path = reference_cache_path(data_path, *settings, f"features={keep_features}") if cache else None
    if path is not None and os.path.isfile(path):
        return load_reference(path)
    ref = reference_from_features(compute_features(), keep_features)
    if path is not None and dist.is_main():
        save_reference(path, ref)
    return ref
