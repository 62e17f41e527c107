"""Consistency tuning (training/loss.py ConsistencyLoss, ECT) and the consistency sampler (SAMPLERS['consistency']):
the loss against its formula, the r(t) mapping, the boundary condition of every preconditioning, the sampler's calls,
Gaussian data where the consistency function is known in closed form, and train.py --consistency end to end."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training.loss import ConsistencyLoss, EDMLoss, ect_r, pseudo_huber
from training.sampling import SAMPLERS

pytestmark = pytest.mark.usefixtures("single_thread")


class Affine(torch.nn.Module):
    """D(x; sigma) = a(sigma) x + b(sigma) with fixed smooth a, b: a denoiser whose every call is easy to redo."""

    def forward(self, x, sigma, class_labels=None, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x / (1 + sigma ** 2) + 0.3 * torch.tanh(sigma)


# ----------------------------------------------------------------------------
# The loss and its schedule.

def test_r_of_t_is_ects_mapping():
    """r = t (1 - (1 + 8 sigmoid(-t)) / 2^(stage + 1)), clamped at 0: values, r < t, r growing with the stage
    toward t."""
    t = torch.tensor([0.01, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    expected = [max(0.0, v * (1 - (1 + 8 / (1 + math.exp(v))) / 2)) for v in t.tolist()]
    assert ect_r(t, 0).tolist() == pytest.approx(expected, rel=1e-12)
    assert ect_r(torch.tensor([10.0], dtype=torch.float64), 0).item() == pytest.approx(4.998183, rel=1e-6)
    previous = torch.zeros_like(t)
    for stage in range(12):
        r = ect_r(t, stage)
        assert bool((r < t).all()) and bool((r >= previous).all())
        previous = r
    assert bool((ect_r(t, 20) / t > 0.9999).all())
    gap = t - ect_r(t, 6)
    assert torch.allclose(gap, t * (1 + 8 * torch.sigmoid(-t)) / 2 ** 7)  # Past the clamp the gap halves each stage.


@pytest.mark.parametrize("c, weighting", [(0.0, "ect"), (0.03, "ect"), (0.06, "edm")])
def test_loss_is_the_weighted_distance_of_the_two_calls(c, weighting):
    """The loss, per image, is pseudo-Huber(D(y + t n; t) - D(y + r n; r)) times ECT's 1 / (t - r) or EDM's
    (t^2 + 0.5^2) / (0.5 t)^2, with D(y + 0 n; 0) = y, for the t, r and n it draws: the same draws redone here from
    the same seed."""
    loss_fn = ConsistencyLoss(c=c, stage_nimg=1000, weighting=weighting)
    loss_fn.set_progress(1500)
    assert loss_fn.stage == 1
    y = torch.randn([64, 1, 2, 2], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    loss = loss_fn(Affine(), y)
    torch.manual_seed(7)
    t = (torch.randn([64, 1, 1, 1]) * 2.0 - 1.1).exp()
    n = torch.randn_like(y)
    r = t * (1 - (1 + 8 * torch.sigmoid(-t)) / 4)
    r = r.clamp(min=0)
    net = Affine()
    target = torch.where(r > 0, net(y + r * n, r.clamp(min=1e-8)), y)
    distance = (net(y + t * n, t) - target).square().flatten(1).sum(1)
    weight = 1 / (t - r) if weighting == "ect" else (t ** 2 + 0.25) / (0.25 * t ** 2)
    expected = ((distance + c ** 2).sqrt() - c) * weight.flatten()
    assert bool((r == 0).any()) and bool((r > 0).any())  # Both branches are exercised.
    assert loss.shape == (64, 1, 1, 1)
    torch.testing.assert_close(loss.flatten(), expected, rtol=1e-5, atol=1e-6)


def test_the_target_leaves_edm2s_weights_as_the_student_left_them():
    """EDM2's layers renormalize their stored weights in place at every call in training (Eq. 66). The target's call
    updates no weight and skips it (as ECT's EDM2 code does): after the loss, each weight has been renormalized once,
    by the student's call, and the target saw the weights the student used."""
    from training.networks.edm2 import MPConv, Precond, normalize
    torch.manual_seed(0)
    net = Precond(8, 1, 0, model_channels=16, channel_mult=[1], num_blocks=1).train()
    layers = [m for m in net.modules() if isinstance(m, MPConv)]
    for layer in layers:
        layer.weight.data.mul_(3)  # Far from unit RMS, so that renormalizing changes them.
    before = [layer.weight.detach().clone() for layer in layers]
    loss_fn = ConsistencyLoss(stage_nimg=1)
    loss_fn.set_progress(3)  # Stage 3: every r > 0, so the target is evaluated.
    loss_fn(net, torch.randn([4, 1, 8, 8]))
    used = [layer for layer, w in zip(layers, before) if not torch.equal(layer.weight, w)]
    assert len(used) > 10 and all(layer.force_weight_norm for layer in layers)
    for layer, w in zip(layers, before):
        if layer in used:
            assert torch.equal(layer.weight, normalize(w))


def test_the_target_gets_no_gradient_and_shares_the_dropout_masks():
    """Gradients flow through the call at t only; both calls draw the same dropout mask."""
    masks = []

    class Dropped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones([]))

        def forward(self, x, sigma, class_labels=None):
            mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)
            masks.append(mask)
            return self.w * x * mask / (1 + torch.as_tensor(sigma).reshape(-1, 1, 1, 1) ** 2)

    net = Dropped()
    loss_fn = ConsistencyLoss(stage_nimg=1)
    loss_fn.set_progress(3)
    y = torch.randn([16, 1, 4, 4], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    loss_fn(net, y).sum().backward()
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    # The gradient redone from the same draws: d/dw of |f_w(y + t n, t) - T| / (t - r), with T computed at w = 1 and
    # held constant; through both calls (no stop-gradient) it is another number.
    torch.manual_seed(5)
    t = (torch.randn([16, 1, 1, 1]) * 2.0 - 1.1).exp()
    n = torch.randn_like(y)
    r = ect_r(t, 3, 2, 8, 1)
    grads = {}
    for stop in (True, False):
        w = torch.ones([], requires_grad=True)
        f = lambda x, sigma: w * x * masks[1] / (1 + sigma ** 2)
        at_r = f(y + r * n, r)
        target = torch.where(r > 0, at_r.detach() if stop else at_r, y)
        distance = (f(y + t * n, t) - target).square().flatten(1).sum(1).sqrt()
        (distance / (t - r).flatten()).sum().backward()
        grads[stop] = w.grad.item()
    assert bool((r > 0).any()) and math.isfinite(grads[True])
    assert net.w.grad.item() == pytest.approx(grads[True], rel=1e-5)
    assert abs(grads[False] - grads[True]) > 0.1 * abs(grads[True])


# ----------------------------------------------------------------------------
# The boundary condition f(x, 0) = x.

@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "edm2"])
def test_every_preconditioning_holds_the_boundary_condition(precond):
    from training import networks
    from training.networks.edm2 import Precond as EDM2Precond
    torch.manual_seed(0)
    if precond == "edm2":
        net = EDM2Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1],
                          num_blocks=1, attn_resolutions=[])
    else:
        net = getattr(networks, precond)(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8,
                                         channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with torch.no_grad():  # Away from the initialization, whose last layers are zero.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn([2, 1, 8, 8])
    with torch.no_grad():
        near_zero = net(x, torch.full([2], 1e-6))
        farther = net(x, torch.full([2], 0.5))
    assert (near_zero - x).abs().max() < 1e-4 < (farther - x).abs().max()


# ----------------------------------------------------------------------------
# The sampler.

@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_consistency_sampler_calls_f_once_per_level_and_renoises_between(nfe):
    """NFE n: n calls, the first at sigma_max on sigma_max z, each later one at its level tau on
    f + sqrt(tau^2 - sigma_min^2) n' (sigma_min, the last level, never called)."""
    calls = []

    def f(x, sigma, class_labels=None):
        calls.append((x.clone(), float(sigma)))
        return torch.full_like(x, 0.25)

    z = torch.randn([3, 1, 2, 2], dtype=torch.float64)
    noises = [torch.randn([3, 1, 2, 2], dtype=torch.float64) for _ in range(nfe)]
    drawn = iter(noises)
    x = SAMPLERS["consistency"](f, z, nfe=nfe, randn_like=lambda _: next(drawn))
    levels = SAMPLERS["consistency"].levels(f, z, nfe, None, 0.002, 80, 7)[0].tolist()
    assert len(calls) == nfe and len(levels) == nfe + 1 and levels[0] == 80 and levels[-1] == pytest.approx(0.002)
    assert torch.equal(calls[0][0], z * 80) and calls[0][1] == 80
    for i in range(1, nfe):
        assert calls[i][1] == levels[i]
        torch.testing.assert_close(calls[i][0], 0.25 + math.sqrt(levels[i] ** 2 - levels[-1] ** 2) * noises[i - 1])
    assert torch.equal(x, torch.full_like(z, 0.25))
    with pytest.raises(ValueError, match="analytic first step is an ODE step; 'consistency' samples a consistency"):
        SAMPLERS["consistency"](f, z, nfe=2, time_steps="edm+gaussian")
    with pytest.raises(ValueError, match="'consistency' draws noise; the search fits deterministic samplers only"):
        SAMPLERS["consistency"](f, z, nfe=2, time_steps="optimized")


MU, S = 0.3, 0.5


def gaussian_consistency_function(x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
    """The exact f for N(MU, S^2) data: MU + (x - MU) S / sqrt(S^2 + t^2)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return MU + (x - MU) * S / (S ** 2 + t ** 2).sqrt()


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_the_exact_consistency_function_samples_the_data(nfe):
    """With the closed-form f of Gaussian data, 1, 2 and 4 calls give N(MU, S^2) samples (up to sigma_max's
    finite size: relative 1e-4 in the std, MU S / sigma_max in the mean)."""
    z = torch.randn([40000, 1, 2, 2], generator=torch.Generator().manual_seed(nfe), dtype=torch.float64)
    generator = torch.Generator().manual_seed(100 + nfe)
    x = SAMPLERS["consistency"](gaussian_consistency_function, z, nfe=nfe,
                                randn_like=lambda y: torch.randn(y.shape, generator=generator, dtype=y.dtype))
    assert abs(x.mean().item() - MU) < 0.006 and abs(x.std().item() / S - 1) < 0.006


class GaussianDenoiser(torch.nn.Module):
    """EDM preconditioning around a per-sigma affine map: D = c_skip x + c_out (a(c_noise) c_in x + b(c_noise)), a
    and b small MLPs of c_noise = ln(sigma) / 4: able to represent both the denoiser and the consistency function
    of Gaussian data."""

    def __init__(self, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x, sigma, class_labels=None, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        a, b = self.mlp((sigma.log() / 4).reshape(-1, 1)).reshape(-1, 2, 1, 1).unbind(1)
        return c_skip * x + c_out * (a.unsqueeze(1) * c_in * x + b.unsqueeze(1))


def _train(net, loss_fn, steps: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for step in range(steps):
        if hasattr(loss_fn, "set_progress"):
            loss_fn.set_progress(step * 256)
        y = MU + S * torch.randn([256, 1, 2, 2], generator=data)
        optimizer.zero_grad()
        loss_fn(net, y).mean().backward()
        optimizer.step()


def _error_to_closed_form(net) -> float:
    z = torch.randn([512, 1, 2, 2], generator=torch.Generator().manual_seed(9))
    errors = []
    with torch.no_grad():
        for t in (0.1, 0.3, 1.0, 3.0, 10.0):
            x = MU + math.sqrt(S ** 2 + t ** 2) * z
            errors.append((net(x, t) - gaussian_consistency_function(x, t)).square().mean().sqrt().item())
    return max(errors)


def test_tuning_a_gaussian_denoiser_moves_it_toward_the_consistency_function():
    """A denoiser trained on N(MU, S^2) data (EDM's loss) is far from the consistency function; ECT's tuning moves it
    within a fifth of that distance."""
    net = GaussianDenoiser()
    _train(net, EDMLoss(P_mean=-0.5, P_std=1.5), steps=400, lr=1e-2, seed=0)
    before = _error_to_closed_form(net)
    _train(net, ConsistencyLoss(stage_nimg=40 * 256), steps=400, lr=3e-3, seed=1)
    after = _error_to_closed_form(net)
    assert before > 0.05 and after < before / 5, (before, after)


# ----------------------------------------------------------------------------
# train.py --consistency, generate.py --sampler=consistency.

TINY = ["--cond=1", "--arch=ddpmpp", "--cbase=8", "--cres=1,2", "--blocks=1", "--batch=8", "--seed=1", "--grid=4",
        "--lr-rampup=0", "--workers=0", "--device=cpu", "--dropout=0.1"]


def test_consistency_options_are_checked(fashion_mnist_8_zip, tmp_path):
    import train
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--ct-stage=1",
                                             "--ct-q=4"])
    assert result.exit_code != 0 and "Error: --ct-stage, --ct-q: options of --consistency" in result.output
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--consistency",
                                             "--p-mean=-0.5", "--dry-run"])
    assert result.exit_code == 0, result.output
    import json
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["loss_kwargs"]["class_name"] == "training.loss.ConsistencyLoss"
    assert (config["loss_kwargs"]["P_mean"], config["loss_kwargs"]["P_std"]) == (-0.5, 2.0)
    assert config["loss_kwargs"]["stage_nimg"] == round(200e6 / 4)
    assert not np.isnan(config["loss_kwargs"]["c"])
    assert pseudo_huber(torch.tensor([[3.0, 4.0]]), 0.0).item() == 5.0


def test_the_training_loop_samples_a_consistency_model_with_two_calls_of_its_sampler():
    """The grids and in-training metrics of a consistency run use the consistency sampler at NFE 2 (at the loss's
    chosen levels where it has them); of any other run, the paper's Heun with the asked steps."""
    from training.loop.monitor import monitoring_sampler
    from training.loss import ConsistencyLoss, EDMLoss
    from training.sampling import NamedSampler, PaperSampler
    assert monitoring_sampler(ConsistencyLoss(), 7) == NamedSampler("consistency", nfe=2)
    chosen = monitoring_sampler(ConsistencyLoss(sample_sigmas=[80, 0.821, 0.002]), 7)
    assert chosen == NamedSampler("consistency", nfe=2, sigmas=(80, 0.821, 0.002))
    assert monitoring_sampler(EDMLoss(), 7) == PaperSampler(num_steps=7)


def _dry_run_config(*args: str) -> dict:
    import train
    result = CliRunner().invoke(train.main, ["--outdir=unused", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])


@pytest.mark.parametrize("recipe", ["ect-cifar", "ect-1hour", "ect-edm2"])
def test_ct_recipes_are_ects_published_settings(fashion_mnist_8_zip, recipe):
    """Each --ct-recipe, as train.py builds it, against ECT's scripts (locuslab/ect: run_ecm.sh, run_ecm_1hour.sh;
    its imgnet branch's run_imgnet_ecm.sh and edm2-img64-s preset), written out here in ECT's own units: steps of
    batch 128, a per-step EMA beta, stages every --double ticks of --tick kimg."""
    ect = {
        "ect-cifar": dict(steps=200_000, lr=1e-4, optimizer="RAdam", betas=[0.9, 0.999], ema_beta=0.9999,
                          stage_steps=250 * 12_800 // 128, q=2, c=0.0, weighting="ect", dropout=0.2, dropout_res=None,
                          P=(-1.1, 2.0), decay=None, mid_t=0.821),
        "ect-1hour": dict(steps=8_000, lr=1e-4, optimizer="RAdam", betas=[0.9, 0.999], ema_beta=0.9993,
                          stage_steps=None, q=256, c=0.0, weighting="ect", dropout=0.2, dropout_res=None,
                          P=(-1.1, 2.0), decay=None, mid_t=0.821),
        "ect-edm2": dict(steps=100_000, lr=1e-3, optimizer="Adam", betas=[0.9, 0.99], ema_beta=0.9999,
                         stage_steps=500 * 6_400 // 128, q=4, c=0.06, weighting="edm", dropout=0.4, dropout_res=16,
                         P=(-0.8, 1.6), decay=2000, mid_t=1.526),
    }[recipe]
    arch = ["--arch=edm2"] if recipe == "ect-edm2" else []
    config = _dry_run_config(f"--data={fashion_mnist_8_zip}", f"--ct-recipe={recipe}", *arch)
    loss, optimizer, network = config["loss_kwargs"], config["optimizer_kwargs"], config["network_kwargs"]
    assert config["batch_size"] == 128 and config["total_kimg"] * 1000 == pytest.approx(ect["steps"] * 128)
    assert optimizer["class_name"] == f"torch.optim.{ect['optimizer']}" and optimizer["lr"] == ect["lr"]
    assert optimizer["betas"] == ect["betas"] and config.get("lr_decay_batches") == ect["decay"]
    assert config["lr_rampup_kimg"] == 0
    assert ect["ema_beta"] ** (config["ema_halflife_kimg"] * 1000 / 128) == pytest.approx(0.5, rel=1e-9)
    assert loss["class_name"] == "training.loss.ConsistencyLoss" and (loss["P_mean"], loss["P_std"]) == ect["P"]
    assert (loss["q"], loss["k"], loss["b"], loss["c"], loss["weighting"]) == (ect["q"], 8, 1, ect["c"], ect["weighting"])
    if ect["stage_steps"] is None:  # One stage for the whole run.
        assert loss["stage_nimg"] >= ect["steps"] * 128
    else:
        assert loss["stage_nimg"] == ect["stage_steps"] * 128
    assert loss["sample_sigmas"] == [80, ect["mid_t"], 0.002]
    assert network["dropout"] == ect["dropout"] and network.get("dropout_res") == ect["dropout_res"]
    # Given options win over the recipe.
    config = _dry_run_config(f"--data={fashion_mnist_8_zip}", f"--ct-recipe={recipe}", *arch, "--lr=0.5", "--ct-q=3")
    assert config["optimizer_kwargs"]["lr"] == 0.5 and config["loss_kwargs"]["q"] == 3


def test_ct_sigmas_reach_the_loss_in_the_order_given(fashion_mnist_8_zip):
    """--ct-sigmas keeps its order (sigma_max first) and is refused, in one line, where the sampler could not use it."""
    import train
    config = _dry_run_config(f"--data={fashion_mnist_8_zip}", "--consistency", "--ct-sigmas=80,0.8,0.002")
    assert config["loss_kwargs"]["sample_sigmas"] == [80, 0.8, 0.002]
    result = CliRunner().invoke(train.main, ["--outdir=unused", f"--data={fashion_mnist_8_zip}", "--consistency",
                                             "--ct-sigmas=0.002,80", "--dry-run"])
    assert result.exit_code != 0 and "strictly decreasing" in result.output


def test_dropout_only_at_and_below_dropout_res():
    from training.networks.edm2 import Precond
    net = Precond(16, 1, 0, model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, dropout=0.3, dropout_res=8)
    rates = {f"{side}.{name}": block.dropout for side in ("enc", "dec")
             for name, block in getattr(net.unet, side).items() if hasattr(block, "dropout")}
    assert rates and all(rate == (0.3 if int(name.split(".")[1].split("x")[0]) <= 8 else 0)
                         for name, rate in rates.items()), rates
    assert {rate for rate in rates.values()} == {0, 0.3}


# ----------------------------------------------------------------------------
# Consistency tuning under torchrun.

def test_only_edm2s_loss_trains_the_log_variance_head():
    """DistributedDataParallel waits for a gradient of every trainable parameter: a loss that never asks for EDM2's
    u(sigma) leaves its head frozen; EDM2Loss trains it; networks without one are left as they are."""
    from conftest import make_tiny_net
    from training.loop.setup import freeze_what_the_loss_never_uses
    from training.loss import EDM2Loss
    from training.networks.edm2 import Precond

    def edm2():
        return Precond(8, 1, 0, model_channels=16, channel_mult=[1], num_blocks=1)

    tuned = edm2()
    assert freeze_what_the_loss_never_uses(tuned, ConsistencyLoss()) == ["logvar_linear.weight"]
    assert [name for name, p in tuned.named_parameters() if not p.requires_grad] == ["logvar_linear.weight"]
    assert freeze_what_the_loss_never_uses(edm2(), EDM2Loss()) == []
    unet = make_tiny_net(label_dim=0)
    assert freeze_what_the_loss_never_uses(unet, ConsistencyLoss()) == []
    assert all(p.requires_grad for p in unet.parameters())


def test_two_processes_tune_an_edm2_network_resume_bit_exactly_and_generate_py_samples_it(fashion_mnist_16_zip,
                                                                                        tmp_path):
    """train.py --consistency on an EDM2 network with 2 processes (gloo): it trains past its second step (DDP and the
    unused log-variance head), the stage follows the images seen, a run resumed from its state at 16 images ends with
    the straight run's weights, and generate.py samples the snapshot with the consistency sampler."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from generate import main as generate_main
    from training.checkpoint import load_network_pkl
    from training.loop.state import read_state_file

    def torchrun(outdir, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   os.path.join(REPO_ROOT, "train.py"), f"--outdir={outdir}", "--nosubdir",
                   f"--data={fashion_mnist_16_zip}", "--arch=edm2", "--cbase=16", "--cres=1,2", "--blocks=1",
                   "--batch=8", "--seed=1", "--grid=0", "--lr-rampup=0", "--workers=0", "--device=cpu",
                   "--dropout=0.1", "--consistency", "--ct-stage=0.016", "--duration=0.000032", "--tick=0.008",
                   "--snap=4", "--dump=1", *extra]
        result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout

    assert "2 processes on cpu" in torchrun(tmp_path / "straight")
    torchrun(tmp_path / "resumed", f"--resume={tmp_path / 'straight' / 'training-state-000000.016.pt'}")
    straight, resumed = (read_state_file(str(tmp_path / run / "training-state-000000.032.pt"))
                         for run in ("straight", "resumed"))
    start = read_state_file(str(tmp_path / "straight" / "training-state-000000.016.pt"))
    assert straight["world_size"] == 2
    assert any(not torch.equal(straight["net"][k], start["net"][k]) for k in straight["net"])  # It trained.
    assert all(torch.equal(straight["net"][k], resumed["net"][k]) for k in straight["net"])

    snapshot = str(tmp_path / "straight" / "network-snapshot-000000.032.pkl")
    loss_fn = load_network_pkl(snapshot)["loss_fn"]
    assert type(loss_fn).__name__ == "ConsistencyLoss" and (loss_fn.P_mean, loss_fn.P_std) == (-1.1, 2.0)
    assert loss_fn.stage_nimg == 16  # Stages 0 and 1 begin at 0 and 16 images.
    # The training loop sets the stage from the image count before each step (one step of 8 images per tick).
    with open(tmp_path / "straight" / "stats.jsonl") as f:
        ticks = [json.loads(line) for line in f]
    logged = [(round(t["Progress/kimg"]["mean"] * 1000), t["Progress/ct_stage"]["mean"]) for t in ticks]
    assert logged == [(nimg, (nimg - 8) // 16) for nimg in (8, 16, 24, 32)]

    out = tmp_path / "out"
    for nfe in (1, 2, 4):
        result = CliRunner().invoke(generate_main, [f"--network={snapshot}", f"--outdir={out}/{nfe}", "--seeds=0-3",
                                                    "--sampler=consistency", f"--nfe={nfe}", "--device=cpu"])
        assert result.exit_code == 0, result.output
        assert f"consistency (NFE {nfe}, edm steps)" in result.output
        assert len(os.listdir(out / str(nfe))) == 4


# ----------------------------------------------------------------------------
# Consistency distillation (--distill).

class Shrink(torch.nn.Module):
    """A teacher D(x; sigma) = x / (1 + k sigma^2), unlike ``Affine``, so the two are told apart."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x, sigma, class_labels=None):
        return x / (1 + self.k * torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("step", ["heun", "euler"])
def test_the_distillation_target_is_one_step_of_the_guided_teachers_ode(step):
    """With a teacher, the point at r is one step of its ODE dx/dsigma = (x - D(x; sigma)) / sigma from x_t = y + t n,
    written out here (Heun's step where r > 0; Euler's to r = 0, which is D(x_t; t)), and the target is the student
    there, or that point where r = 0. The teacher here is guided: D_g + w (D - D_g), w = 2."""
    from training.sampling import guided
    loss_fn = ConsistencyLoss(stage_nimg=1000, teacher_step=step)
    loss_fn.set_progress(1500)
    loss_fn.teacher = guided(Shrink(1.0), Shrink(3.0), 2.0)
    y = torch.randn([64, 1, 2, 2], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    loss = loss_fn(Affine(), y)

    def teacher(x, sigma):
        return 2 * x / (1 + sigma ** 2) - x / (1 + 3 * sigma ** 2)
    torch.manual_seed(7)
    t = (torch.randn([64, 1, 1, 1]) * 2.0 - 1.1).exp()
    n = torch.randn_like(y)
    r = (t * (1 - (1 + 8 * torch.sigmoid(-t)) / 4)).clamp(min=0)
    x_t = y + t * n
    d_t = (x_t - teacher(x_t, t)) / t
    euler = x_t + (r - t) * d_t
    r_safe = r.clamp(min=1e-8)
    heun = x_t + (r - t) * (d_t + (euler - teacher(euler, r_safe)) / r_safe) / 2
    x_r = torch.where(r > 0, heun, euler) if step == "heun" else euler
    target = torch.where(r > 0, Affine()(x_r, r_safe), x_r)
    distance = (Affine()(x_t, t) - target).square().flatten(1).sum(1).sqrt()
    assert bool((r == 0).any()) and bool((r > 0).any())
    torch.testing.assert_close(loss.flatten(), distance / (t - r).flatten(), rtol=1e-5, atol=1e-6)


def test_two_processes_distill_a_guided_teacher_which_stays_out_of_the_snapshots(fashion_mnist_8_zip, tmp_path):
    """train.py --distill with an autoguided teacher, under torchrun with 2 processes: it trains, says what it
    distils, and its snapshots hold the loss without the teacher."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from training.checkpoint import load_network_pkl
    from training.loop.state import read_state_file
    saved = os.path.join(REPO_ROOT, "tests", "fixtures", "saved_runs")
    teacher = os.path.join(saved, "edm2", "network-snapshot-000000.272.pkl")
    guide = os.path.join(saved, "ddpmpp", "network-snapshot-000000.272.pkl")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "train.py"), f"--outdir={tmp_path}", "--nosubdir",
               f"--data={fashion_mnist_8_zip}", "--arch=edm2", "--cond=1", "--cbase=8", "--cres=1,1", "--blocks=1",
               "--attn=4", "--batch=8", "--seed=1", "--grid=4", "--lr-rampup=0", "--workers=0", "--device=cpu",
               f"--distill={teacher}", f"--distill-guide={guide}", "--distill-guidance=2", "--ct-stage=0.008",
               "--duration=0.000016", "--tick=0.008", "--snap=2", "--dump=2"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Distilling {teacher}, guided by {guide} at w = 2" in result.stdout
    assert "Transferred" in result.stdout  # The student starts as the teacher.
    snapshot = load_network_pkl(str(tmp_path / "network-snapshot-000000.016.pkl"))
    assert type(snapshot["loss_fn"]).__name__ == "ConsistencyLoss" and snapshot["loss_fn"].teacher is None
    state = read_state_file(str(tmp_path / "training-state-000000.016.pt"))
    start = load_network_pkl(teacher)["ema"].state_dict()
    assert any(not torch.equal(state["net"][k], start[k]) for k in start if "logvar" not in k)  # It trained.


def test_distill_options_are_checked(fashion_mnist_8_zip, tmp_path):
    import train
    for args, message in [(["--distill-guidance=2"], "Error: --distill-guidance: options of --distill=TEACHER"),
                          (["--distill=missing.pkl"], "Error: --distill=missing.pkl:"),
                          ([f"--distill={tmp_path}/x.pkl", "--distill-guide=uncond"],
                           "Error: --distill-guide and --distill-guidance go together")]:
        result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", *args])
        assert result.exit_code != 0 and message in result.output, result.output


def test_weightings_and_distance_on_numbers_worked_by_hand():
    """The pieces benchmarks/ect_side_by_side.py found equal to ECT's code, bit for bit, on numbers worked by hand:
    ECT's 1 / (t - r) at t = 1, r = 0.75 is 4; EDM's (t^2 + 0.25) / (0.5 t)^2 at t = 0.5 is 8; the pseudo-Huber
    distance of (3, 4) with c = 0.06 is sqrt(25.0036) - 0.06."""
    t, r = torch.tensor([[[[1.0]]], [[[0.5]]]]), torch.tensor([[[[0.75]]], [[[0.0]]]])
    ones = torch.ones(2)
    assert ConsistencyLoss(weighting="ect").weighted(ones, t, r).tolist() == [4.0, 2.0]
    assert ConsistencyLoss(weighting="edm").weighted(ones, t, r).tolist() == pytest.approx([1.25 / 0.25, 8.0])
    assert pseudo_huber(torch.tensor([[3.0, 4.0]]), 0.06).item() == pytest.approx(25.0036 ** 0.5 - 0.06, rel=1e-6)
