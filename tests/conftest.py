"""Shared fixtures."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_T10K = os.path.join(REPO_ROOT, "data", "fashion-mnist", "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def fashion_mnist_zip(tmp_path_factory) -> str:
    """The embedded Fashion-MNIST test split as a dataset ZIP: 10,000 images, 1x32x32, 10 classes (~1.5 s)."""
    from training.dataset_tool_lib import convert_dataset

    dest = str(tmp_path_factory.mktemp("fashion-mnist") / "fashion-mnist-t10k-32x32.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, workers=1, progress=False)
    return dest
