"""Shared fixtures: the official test vectors, the official layout spec, tiny networks, the embedded dataset."""

from __future__ import annotations

import json
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FASHION_MNIST_T10K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fashion-mnist",
                                  "t10k-images-idx3-ubyte.gz")


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


@pytest.fixture(scope="session")
def fashion_mnist_zip(tmp_path_factory) -> str:
    """The embedded Fashion-MNIST test split as a dataset ZIP: 10,000 images, 1x32x32, 10 classes (~1.5 s)."""
    from training.dataset_tool_lib import convert_dataset

    dest = str(tmp_path_factory.mktemp("fashion-mnist") / "fashion-mnist-t10k-32x32.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, workers=1, progress=False)
    return dest


def _small_fashion_mnist(tmp_path_factory, resolution: int, count: int) -> str:
    from training.dataset_tool_lib import convert_dataset

    dest = str(tmp_path_factory.mktemp("fashion-mnist") / f"fmnist{resolution}.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, max_images=count, resolution=(resolution, resolution), workers=1,
                    progress=False)
    return dest


@pytest.fixture(scope="session")
def fashion_mnist_16_zip(tmp_path_factory) -> str:
    """256 embedded Fashion-MNIST images resized to 16x16, with their 10 class labels (training tests)."""
    return _small_fashion_mnist(tmp_path_factory, 16, 256)


@pytest.fixture(scope="session")
def fashion_mnist_8_zip(tmp_path_factory) -> str:
    """256 embedded Fashion-MNIST images at 8x8 (the fastest train.py runs)."""
    return _small_fashion_mnist(tmp_path_factory, 8, 256)
