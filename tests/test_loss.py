"""Losses: p_train(sigma), lambda(sigma) and the per-pixel weighted loss of Section 5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.loss import EDMLoss, VELoss, VPLoss
from training.networks import EDMPrecond, vp_sigma_inv


class RecordingZeroNet(torch.nn.Module):
    """A denoiser that returns zeros and records what it was called with."""

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.x, self.sigma, self.class_labels, self.kwargs = x, sigma, class_labels, kwargs
        return torch.zeros_like(x)


# Table 1's loss weights, written out independently of training/loss.py.
TABLE1_WEIGHT = {
    "VPLoss": lambda sigma: 1 / sigma ** 2,
    "VELoss": lambda sigma: 1 / sigma ** 2,
    "EDMLoss": lambda sigma: (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2,
}


@pytest.mark.parametrize("loss_fn", [VPLoss(), VELoss(), EDMLoss()], ids=lambda f: type(f).__name__)
def test_weights_are_table_1(loss_fn):
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    torch.testing.assert_close(loss_fn.weight(sigma), TABLE1_WEIGHT[type(loss_fn).__name__](sigma), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_fn", [VPLoss(), VELoss(), EDMLoss()], ids=lambda f: type(f).__name__)
def test_noise_added_to_each_image_has_std_sigma(loss_fn):
    """n = (noisy input - y) is zero-mean Gaussian with std sigma for each image, whatever sigma it drew."""
    torch.manual_seed(1)
    net = RecordingZeroNet()
    images = torch.rand(8, 3, 64, 64) * 2 - 1
    loss_fn(net=net, images=images)
    unit = ((net.x - images) / net.sigma).double().flatten(1)  # [8, 12288], should be N(0, 1) per image
    assert unit.std(dim=1).sub(1).abs().max() < 0.03 and unit.mean(dim=1).abs().max() < 0.03


def test_edm_effective_weight_is_one():
    """Eq. 8: lambda(sigma) c_out(sigma)^2 = 1 for EDM at every sigma."""
    loss = EDMLoss()
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    _, c_out, _, _ = net.coefficients(sigma)
    torch.testing.assert_close(loss.weight(sigma) * c_out ** 2, torch.ones_like(sigma))


def test_edm_sigma_is_lognormal():
    torch.manual_seed(0)
    sigma = EDMLoss(P_mean=-1.2, P_std=1.2).sample_sigma([200_000, 1, 1, 1], torch.device("cpu"))
    log_sigma = sigma.log().double()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_ve_sigma_is_log_uniform():
    torch.manual_seed(0)
    sigma = VELoss(sigma_min=0.02, sigma_max=100).sample_sigma([200_000, 1, 1, 1], torch.device("cpu"))
    u = (sigma.log() - math.log(0.02)) / (math.log(100) - math.log(0.02))
    assert sigma.min() >= 0.02 * (1 - 1e-6) and sigma.max() <= 100 * (1 + 1e-6)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.005)


def test_vp_sigma_follows_uniform_t():
    torch.manual_seed(0)
    sigma = VPLoss().sample_sigma([200_000, 1, 1, 1], torch.device("cpu")).double()
    # Table 1's VP sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), inverted here by the quadratic formula.
    t = ((0.1 ** 2 + 2 * 19.9 * (sigma ** 2 + 1).log()).sqrt() - 0.1) / 19.9
    torch.testing.assert_close(t, vp_sigma_inv(sigma, 19.9, 0.1))
    assert t.min() >= 1e-5 - 1e-6 and t.max() <= 1 + 1e-6
    assert t.mean().item() == pytest.approx((1 + 1e-5) / 2, abs=0.01)


@pytest.mark.parametrize("loss_fn", [EDMLoss(), VPLoss(), VELoss()])
def test_loss_is_weighted_squared_error(loss_fn):
    """With D = 0 the loss is lambda(sigma) y^2 per pixel, and the noisy input is y + n with std sigma."""
    torch.manual_seed(0)
    net = RecordingZeroNet()
    images = torch.randn(6, 3, 8, 8)
    labels = torch.eye(10)[:6]
    loss = loss_fn(net=net, images=images, labels=labels)
    assert loss.shape == images.shape
    torch.testing.assert_close(loss, TABLE1_WEIGHT[type(loss_fn).__name__](net.sigma) * images ** 2)
    assert net.class_labels is labels and net.kwargs == {"augment_labels": None}
    assert net.sigma.shape == (6, 1, 1, 1)


def test_augment_pipe_output_reaches_network():
    net = RecordingZeroNet()
    images = torch.randn(4, 1, 8, 8)
    flipped = images.flip(3)
    aug_labels = torch.ones(4, 9)
    loss = EDMLoss()(net=net, images=images, augment_pipe=lambda y: (flipped, aug_labels))
    assert net.kwargs["augment_labels"] is aug_labels
    torch.testing.assert_close(loss, EDMLoss().weight(net.sigma) * flipped ** 2)
