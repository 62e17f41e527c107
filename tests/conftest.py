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
