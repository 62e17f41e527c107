"""Shared test fixtures: the official vectors, tiny networks, made-up official-format pickles."""

from __future__ import annotations

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
OFFICIAL_VECTORS = os.path.join(REPO_ROOT, "tests", "fixtures", "official-vectors.pt")


@pytest.fixture(scope="session")
def official_vectors() -> dict:
    return torch.load(OFFICIAL_VECTORS, weights_only=True)


def build_official_case(case: dict) -> torch.nn.Module:
    """Our network for an official-vectors case, with the official random weights loaded strictly."""
    from training import networks
    net = getattr(networks, case["class_name"])(**case["init_kwargs"])
    net.load_state_dict(case["state_dict"], strict=True)
    return net.eval()


def make_tiny_net(label_dim: int = 4, resolution: int = 8, seed: int = 0) -> torch.nn.Module:
    """A few-thousand-parameter EDMPrecond(SongUNet) with random weights, for fast end-to-end tests."""
    from training.networks import EDMPrecond
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type="SongUNet",
                     model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    # The last layer starts near zero; randomize all weights so images depend on them.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval()


@pytest.fixture
def tiny_net() -> torch.nn.Module:
    return make_tiny_net()


@pytest.fixture
def single_thread():
    """Run the body single-threaded: the test machine's cores are shared, and two threads on small
    convolutions are slower than one there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
