"""EDM2's loss with learned uncertainty (training/loss.py, EDM2Loss) and its learning-rate schedule
(training/loop/schedules.py), against their formulas and the official EDM2 code's values."""

from __future__ import annotations

import io
import math
import os
import pickle

import pytest
import torch

from conftest import FIXTURES
from training.checkpoint import safe_unpickle
from training.loss import EDM2Loss, EDMLoss
from training.loop.schedules import edm2_learning_rate


class StubDenoiser(torch.nn.Module):
    """D(x; sigma) = 0.8 x + 0.1 sigma and u(sigma) = 0.3 ln(sigma) - 0.2: known, and different per image;
    records its inputs."""

    def forward(self, x, sigma, class_labels=None, return_logvar=False, **kwargs):
        self.x, self.sigma, self.class_labels, self.kwargs = x, sigma, class_labels, kwargs
        D = 0.8 * x + 0.1 * sigma
        return (D, 0.3 * sigma.log() - 0.2) if return_logvar else D


@pytest.fixture
def float64_default():
    """Random draws in float64, so that the loss and its formula below agree to rounding."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def test_loss_is_eq_21(float64_default):
    """loss = lambda(sigma) / e^u * (D(y + n; sigma) - y)^2 + u, per pixel, with ln(sigma) ~ N(P_mean, P_std^2)
    and n ~ N(0, sigma^2): the same draws redone here in the loss's order (sigma per image, then the noise)."""
    P_mean, P_std, sigma_data = -0.4, 1.0, 0.5
    g = torch.Generator().manual_seed(3)
    images = torch.rand([6, 3, 8, 8], generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.eye(4, dtype=torch.float64)[[0, 1, 2, 3, 0, 1]]
    net = StubDenoiser()
    torch.manual_seed(7)
    loss = EDM2Loss()(net=net, images=images, labels=labels)

    torch.manual_seed(7)
    sigma = torch.exp(P_mean + P_std * torch.randn([6, 1, 1, 1]))
    n = torch.randn_like(images) * sigma
    D = 0.8 * (images + n) + 0.1 * sigma
    u = 0.3 * sigma.log() - 0.2
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    expected = weight / u.exp() * (D - images) ** 2 + u
    assert loss.shape == images.shape
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(net.sigma, sigma, rtol=0, atol=0)
    assert net.class_labels is labels and net.kwargs == {}


def test_sigma_is_lognormal_with_edm2_defaults():
    loss = EDM2Loss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-0.4, 1.0, 0.5)
    torch.manual_seed(0)
    log_sigma = loss.sample_sigma([200_000, 1, 1, 1], torch.device("cpu")).log().double()
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.0, abs=0.01)


def test_best_uncertainty_is_the_log_of_the_weighted_error():
    """For a constant u the loss lambda e^-u |D - y|^2 + u, averaged, is smallest at u = ln(lambda mean|D - y|^2):
    the learned u(sigma) tracks the network's own weighted error (paper Section 2, 'uncertainty')."""
    images = torch.zeros([1, 1, 32, 32], dtype=torch.float64)

    def mean_loss(u: float) -> float:
        class ConstantU(torch.nn.Module):
            def forward(self, x, sigma, class_labels=None, return_logvar=False):
                return 0.5 * x, torch.full([x.shape[0], 1, 1, 1], u, dtype=x.dtype)

        torch.manual_seed(11)
        return EDM2Loss(P_mean=0.0, P_std=0.0)(ConstantU(), images).mean().item()

    torch.manual_seed(11)
    torch.randn([1, 1, 1, 1])  # sigma's draw; with P_std = 0, sigma = e^0 = 1.
    n = torch.randn_like(images)
    best = math.log((1 + 0.25) / 0.25 * ((0.5 * n) ** 2).mean().item())  # lambda(1) = (1 + 0.5^2) / 0.5^2
    assert mean_loss(best) < min(mean_loss(best - 0.01), mean_loss(best + 0.01))
    assert mean_loss(best) == pytest.approx(1 + best, rel=1e-12)  # lambda e^-u mean|D - y|^2 = 1 there.


def test_augment_labels_reach_the_network_only_with_a_pipe():
    images = torch.zeros([2, 3, 8, 8])
    pipe = lambda y: (y.flip(3), torch.ones([y.shape[0], 9]))  # noqa: E731
    net = StubDenoiser()
    EDM2Loss()(net, images, augment_pipe=pipe)
    assert torch.equal(net.kwargs["augment_labels"], torch.ones([2, 9]))
    EDM2Loss()(net, images)
    assert net.kwargs == {}


def test_pickles_as_a_persistent_class_and_loads_safely():
    loss = EDM2Loss(P_mean=-0.8, P_std=1.6)
    restored = safe_unpickle(io.BytesIO(pickle.dumps(loss)))
    assert type(restored) is EDM2Loss and isinstance(restored, EDMLoss)
    assert (restored.P_mean, restored.P_std, restored.sigma_data) == (-0.8, 1.6, 0.5)


# ----------------------------------------------------------------------------
# Learning rate.

@pytest.fixture(scope="module")
def golden_lr() -> tuple[dict, dict]:
    vectors = torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)
    return vectors["lr_schedule"], vectors["lr_args"]


def test_learning_rate_equals_official(golden_lr):
    schedule, args = golden_lr
    assert len(schedule) >= 5
    for nimg, lr in schedule.items():
        assert edm2_learning_rate(int(nimg), **args) == pytest.approx(lr, rel=1e-12, abs=1e-15), nimg


def test_learning_rate_is_inverse_sqrt_after_linear_ramp_up():
    """alpha = alpha_ref min(nimg / rampup, 1) / sqrt(max(t / t_ref, 1)), t = nimg / batch steps."""
    args = dict(batch_size=1000, ref_lr=0.02, ref_batches=5000, rampup_Mimg=2)
    assert edm2_learning_rate(0, **args) == 0
    assert edm2_learning_rate(500_000, **args) == pytest.approx(0.02 * 0.25, rel=1e-12)  # A quarter of the ramp.
    assert edm2_learning_rate(2_000_000, **args) == pytest.approx(0.02, rel=1e-12)  # Ramp done, t < t_ref.
    assert edm2_learning_rate(5_000_000, **args) == pytest.approx(0.02, rel=1e-12)  # t = t_ref.
    assert edm2_learning_rate(20_000_000, **args) == pytest.approx(0.02 / 2, rel=1e-12)  # t = 4 t_ref.
    assert edm2_learning_rate(10 ** 9, **args) == pytest.approx(0.02 / math.sqrt(200), rel=1e-12)
    assert edm2_learning_rate(10 ** 9, **dict(args, ref_batches=0)) == 0.02  # No decay.
    assert edm2_learning_rate(1000, **dict(args, rampup_Mimg=0)) == 0.02  # No ramp-up.
