"""Files that train.py wrote with the code of an earlier date (tests/fixtures/saved_runs, made by its make.py) still
load, sample the images that code sampled from them, and resume to the weights of the uninterrupted run.

Bit for bit on the CPU that wrote them (AVX2); elsewhere oneDNN's float32 kernels may round the tiny networks'
convolutions differently (see test_samplers), so the float samples are compared to 1e-5 of their range, the uint8
images, truncated from them, to one level, and the resumed weights to the spread that training steps make of that
rounding (``RESUME_SPREAD``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import dnnlib
from conftest import FIXTURES
from training.checkpoint import load_network_pkl
from training.sampling import SeedRNG, draw_class_labels, draw_latents, generate_images, guided, sampler_spec

SAVED = os.path.join(FIXTURES, "saved_runs")


def _make_module():
    spec = importlib.util.spec_from_file_location("saved_runs_make", os.path.join(SAVED, "make.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make_module()


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(os.path.join(SAVED, "expected.pt"), weights_only=True)


def _load(snapshot: str | None):
    return None if snapshot is None else load_network_pkl(os.path.join(SAVED, snapshot))["ema"].eval()


@pytest.mark.parametrize("run, network, loss", [("ddpmpp", "EDMPrecond", "EDMLoss"), ("edm2", "Precond", "EDM2Loss")])
def test_saved_snapshots_load_with_every_object(run, network, loss):
    data = load_network_pkl(os.path.join(SAVED, run, "network-snapshot-000000.272.pkl"))
    assert type(data["ema"]).__name__ == network and type(data["loss_fn"]).__name__ == loss
    assert data["ema"].img_resolution == 8 and data["ema"].label_dim == 10
    if run == "ddpmpp":
        assert type(data["augment_pipe"]).__name__ == "AugmentPipe" and data["augment_pipe"].p == 0.5
    # The class path the snapshot records for its dataset still names the dataset class.
    dataset_class = dnnlib.util.get_obj_by_name(data["dataset_kwargs"]["class_name"])
    assert data["dataset_kwargs"]["class_name"] == "training.dataset.ImageFolderDataset"
    assert dataset_class.__name__ == "ImageFolderDataset" and hasattr(dataset_class, "get_label")


def test_the_saved_samplings_differ_from_each_other(expected):
    """The pinned outputs are not degenerate: every sampler option and snapshot leaves its mark on the images."""
    samples = list(expected["samples"].values())
    for i, a in enumerate(samples):
        assert a.std() > 0.05
        for b in samples[i + 1:]:
            assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("case", MAKE.SAMPLINGS, ids=lambda case: case[0])
def test_saved_snapshots_sample_the_images_they_gave(case, expected):
    name, snapshot, options, guide, weight, class_idx = case
    denoiser = guided(_load(snapshot), _load(guide), weight)
    seeds = expected["seeds"]
    rng = SeedRNG(seeds)
    latents, labels = draw_latents(denoiser, rng), draw_class_labels(denoiser, rng, class_idx)
    with torch.no_grad():
        samples = sampler_spec(**options).run(denoiser, latents, labels, randn_like=rng.randn_like)
    pinned = expected["samples"][name]
    torch.testing.assert_close(samples, pinned, rtol=0, atol=1e-5 * pinned.abs().max().item())
    images = generate_images(denoiser, seeds, class_idx=class_idx, device="cpu",
                             sampler=sampler_spec(**options))
    assert images.dtype == torch.uint8
    assert (images.int() - expected["images"][name].int()).abs().max() <= 1


# How far 15 resumed steps from the saved state may end from the weights the saving CPU reached, as a fraction of how
# far those steps moved them: ||ours - saved|| / ||saved - state at 272 images||, over all tensors of the state dict.
# Adam at lr 1e-2 on a tiny network turns float rounding into visible changes of the weights, so other kernels cannot
# give the saved bits. Measured (docs/testing.md): 0 under the saving CPU's kernels (AVX2); 0.0020-0.0033 under
# AVX-512, under AVX2 with ATen's default kernels and under SSE4.1 ones; a resume that loses the RNG state gives 0.49,
# one that loses Adam's moments 1.5.
RESUME_SPREAD = 0.02


def _relative_distance(ours: dict, theirs: dict, start: dict) -> float:
    def flat(state: dict) -> torch.Tensor:
        return torch.cat([state[name].double().flatten() for name in sorted(theirs)])
    return ((flat(ours) - flat(theirs)).norm() / (flat(theirs) - flat(start)).norm()).item()


def test_saved_training_state_resumes_to_the_uninterrupted_runs_weights(fashion_mnist_8_zip, tmp_path, expected):
    """train.py --resume from the saved state at 272 images runs the last 15 steps and ends where the uninterrupted run
    of the earlier code ended (make.py checked that equality when it saved them), to the spread of float kernels
    across CPUs. (Resuming bit-exactly on one machine: test_training_loop.py, test_edm2_training.py.)"""
    state = os.path.join(SAVED, "ddpmpp", "training-state-000000.272.pt")
    MAKE.train(str(tmp_path), fashion_mnist_8_zip, "ddpmpp", f"--resume={state}")
    final = torch.load(tmp_path / "training-state-000000.512.pt", weights_only=True)
    start = torch.load(state, weights_only=True)
    for key in ("net", "ema"):
        ours, theirs = final[key], expected[f"resumed_{key}"]
        assert ours.keys() == theirs.keys()
        assert all(ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape for name in ours)
        assert _relative_distance(ours, theirs, start[key]) < RESUME_SPREAD, key
