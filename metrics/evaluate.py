"""Metrics of a set of features against a reference: what ``fid.py``, the training loop and users' scripts call."""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np

from torch_utils import distributed as dist
from metrics.frechet import feature_statistics, frechet_distance, kernel_inception_distance
from metrics.reference import LAYOUTS, load_reference, reference_cache_path, save_reference

METRICS = ("fid", "kid", "fd_dinov2")
DETECTOR_OF = {"fid": "inception", "kid": "inception", "fd_dinov2": "dinov2"}  # Whose features each metric compares.


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """'fid,kid,fd_dinov2' -> ['fid', 'kid', 'fd_dinov2'], checked against :data:`METRICS`."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric '{unknown[0] if unknown else text}'; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def detectors_for(metrics: Sequence[str]) -> list[str]:
    """The detectors whose features ``metrics`` compare, each once, in order: ['fid', 'kid'] -> ['inception']."""
    return list(dict.fromkeys(DETECTOR_OF[name] for name in parse_metrics(metrics)))


def load_detectors(metrics: Sequence[str], device, inception: str | None = None, dinov2: str | None = None,
                   preprocess_mode: str = "nvidia") -> dict:
    """Detector name -> detector, for the features ``metrics`` compare: the FID Inception with the weights of
    ``inception`` and ``preprocess_mode`` (metrics.detector), DINOv2 ViT-L/14 with those of ``dinov2``
    (metrics.dinov2); None: each one's standard source."""
    from metrics.detector import load_detector
    from metrics.dinov2 import load_dinov2_detector
    loaders = {"inception": lambda: load_detector(inception, device=device, preprocess_mode=preprocess_mode),
               "dinov2": lambda: load_dinov2_detector(dinov2, device=device)}
    return {name: loaders[name]() for name in detectors_for(metrics)}


def reference_from_features(features: np.ndarray, keep_features: bool = False,
                            detector: str = "inception") -> dict[str, np.ndarray]:
    """Reference statistics of one detector's features in our layout (metrics.reference.LAYOUTS): for the
    Inception the official format (``mu``, ``sigma``), for DINOv2 ``fd_dinov2_mu``, ``fd_dinov2_sigma``; with the
    features too if asked (for KID, or to reuse them)."""
    layout = LAYOUTS[detector]
    mu, sigma = feature_statistics(features)
    ref = {layout.key("mu"): mu, layout.key("sigma"): sigma}
    if keep_features:
        ref[layout.key("features")] = np.asarray(features, dtype=np.float32)
    return ref


def check_reference_for(ref: dict[str, np.ndarray], metrics: Sequence[str]) -> None:
    """Raise ValueError, in one line, if ``ref`` lacks what one of ``metrics`` needs."""
    for name in parse_metrics(metrics):
        layout = LAYOUTS[DETECTOR_OF[name]]
        if name == "kid" and "features" not in ref:
            raise ValueError("KID needs the reference's features, which this reference file lacks; pass the "
                             "dataset itself as the reference, or make the file with `fid.py ref --features`")
        if layout.key("mu") not in ref:
            raise ValueError(f"{name.upper()} needs the reference's {DETECTOR_OF[name]} statistics "
                             f"('{layout.key('mu')}', '{layout.key('sigma')}'), which this reference lacks; pass the "
                             f"dataset itself as the reference, or make the file with `fid.py ref --metrics={name}`")


def compute_metrics(features: np.ndarray | Mapping[str, np.ndarray], ref: dict[str, np.ndarray],
                    metrics: Sequence[str] = ("fid",), kid_seed: int = 0) -> dict[str, float]:
    """Each requested metric against ``ref`` (our layout, metrics.reference). ``features``: detector name ->
    features [N, D] of the evaluated images, or the Inception's features [N, 2048] alone.

    FID and FD-DINOv2 are the Fréchet distance of the Gaussians fitted to the features of their detectors;
    KID compares the Inception's features with the reference's (``features``)."""
    by_detector = features if isinstance(features, Mapping) else {"inception": features}
    metrics = parse_metrics(metrics)
    check_reference_for(ref, metrics)
    results = {}
    for name in metrics:
        detector, layout = DETECTOR_OF[name], LAYOUTS[DETECTOR_OF[name]]
        if detector not in by_detector:
            raise ValueError(f"{name.upper()} needs {detector} features, which were not computed")
        if name == "kid":
            results["kid"] = kernel_inception_distance(by_detector[detector], ref["features"], seed=kid_seed)
        else:
            mu, sigma = feature_statistics(by_detector[detector])
            results[name] = frechet_distance(mu, sigma, ref[layout.key("mu")], ref[layout.key("sigma")])
    return results


def detector_settings(detector) -> list[str]:
    """What, besides the images, shapes a detector's features: which detector, its weights and its preprocessing.
    The Inception's settings name no detector: they are those of the caches made before there were others."""
    name = getattr(detector, "name", "inception")
    return ([] if name == "inception" else [f"detector={name}"]) + [
        f"weights={detector.weights_sha256}", f"preprocess={detector.preprocess_mode}"]


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


def cached_dataset_references(data_path: str, detectors: Mapping[str, Callable],
                              compute_features: Callable[[Mapping[str, Callable]], Mapping[str, np.ndarray]],
                              settings: Sequence[str] = (), keep_features: bool = False,
                              cache: bool = True) -> dict[str, np.ndarray]:
    """Reference statistics of a dataset for each detector (name -> detector), merged in our layout.

    Each detector's statistics are cached apart, keyed by the dataset's content hash, ``detector_settings`` and
    ``settings`` (the Inception's in the file :func:`cached_dataset_reference` would use), so that asking for
    one more metric reuses what is cached. ``compute_features(missing)`` gets the detectors whose statistics are
    not cached and returns the features of each (name -> features), from one pass over the images.
    Every process calls this; all compute, the main process writes the cache.
    """
    paths = {name: reference_cache_path(data_path, *detector_settings(detector), *settings,
                                        f"features={keep_features}") if cache else None
             for name, detector in detectors.items()}
    ref, missing = {}, {}
    for name, path in paths.items():
        if path is not None and os.path.isfile(path):
            ref.update(load_reference(path))
        else:
            missing[name] = detectors[name]
    if missing:
        features = compute_features(missing)
        for name in missing:
            part = reference_from_features(features[name], keep_features, detector=name)
            if paths[name] is not None and dist.is_main():
                save_reference(paths[name], part)
            ref.update(part)
    return ref
