"""EDM2's magnitude-preserving network (training/networks/edm2.py): the official outputs, the official presets'
layouts, the magnitude-preserving properties of each layer, and official-format pickles both ways."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, _OfficialPersistentObject, as_official
from torch_utils import persistence
from training.data.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.checkpoint import (UnsafePickleError, is_latent_snapshot, load_network_pkl,
                                 save_network_pkl)
from training.networks import EDM2Block, EDM2Precond, MPConv, MPFourier, mp_cat, mp_silu, mp_sum
from training.networks.edm2 import normalize, resample

pytestmark = pytest.mark.usefixtures("single_thread")

OFFICIAL_MODULE_SRC = "raise SystemExit('training/networks_edm2.py was executed: a loader must never run it')\n"


@pytest.fixture(scope="module")
def golden() -> dict:
    """A small Precond (16x16, 10 classes, attention at 8x8, nonzero gains) and its outputs by the official code."""
    return torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)


def golden_net(golden: dict, state_dict: dict | None = None) -> EDM2Precond:
    net = EDM2Precond(**golden["init_kwargs"]).eval()
    net.load_state_dict(golden["state_dict"] if state_dict is None else state_dict, strict=True)
    return net


def run(net, golden: dict):
    with torch.no_grad():
        return net(golden["x"], golden["sigma"], golden["labels"], return_logvar=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()

# ----------------------------------------------------------------------------
# The official outputs and layouts.


def test_matches_official_outputs(golden):
    """D(x; sigma) and u(sigma) of the official code for sigma 0.02, 1 and 30 (relative error < 1e-5)."""
    D, logvar = run(golden_net(golden), golden)
    assert D.dtype == logvar.dtype == torch.float32 and logvar.shape == (3, 1, 1, 1)
    assert relative_error(D, golden["D"]) < 1e-5
    assert relative_error(logvar, golden["logvar"]) < 1e-5
    assert (D - golden["x"]).abs().mean() > 0.1  # The U-Net matters at these sigmas (the gains are nonzero).


@pytest.mark.parametrize("preset", ["edm2-img64-s", "edm2-img512-xs"])
def test_official_preset_layout(preset):
    """The official presets' constructor calls give their exact tensor names, shapes, order and counts."""
    with open(os.path.join(FIXTURES, "edm2-layout.json")) as f:
        spec = json.load(f)[preset]
    with torch.device("meta"):
        net = persistence.registered_class(spec["class_name"])(**spec["init_kwargs"])
    assert [(name, list(t.shape)) for name, t in net.state_dict().items()] == \
           [(name, shape) for name, shape, _ in spec["state_dict"]]
    assert sum(p.numel() for p in net.parameters()) == spec["params"]
    assert sum(b.numel() for b in net.buffers()) == spec["buffers"]

# ----------------------------------------------------------------------------
# Magnitude preservation (Section 2): unit-magnitude input, unit-magnitude output.


def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def test_fixed_function_layers_preserve_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 256, generator=g), torch.randn(4096, 64, generator=g)
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.003)  # silu alone: 0.596.
    assert rms(torch.nn.functional.silu(a)) == pytest.approx(0.596, abs=0.002)
    for t in (0.3, 0.5, 0.9):
        assert rms(mp_sum(a, torch.randn(4096, 256, generator=g), t=t)) == pytest.approx(1, abs=0.003)
    assert torch.equal(mp_sum(a, b[:, :1], t=0), a)
    for t in (0.3, 0.5):
        out = mp_cat(a, b, t=t)
        assert out.shape == (4096, 320) and rms(out) == pytest.approx(1, abs=0.003)
        # The parts carry energy (1 - t)^2 : t^2, whatever their channel counts (256 and 64).
        energy_a, energy_b = out[:, :256].square().sum(), out[:, 256:].square().sum()
        assert (energy_a / energy_b).item() == pytest.approx((1 - t) ** 2 / t ** 2, rel=0.01)


def test_fourier_features_have_unit_magnitude():
    fourier = MPFourier(8192)
    assert fourier.freqs.std().item() == pytest.approx(2 * math.pi, rel=0.03)
    assert 0 <= fourier.phases.min() and fourier.phases.max() < 2 * math.pi
    features = fourier(torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0]))
    assert features.shape == (5, 8192)
    for row in features:
        assert rms(row) == pytest.approx(1, abs=0.02)
    assert features.abs().max().item() <= math.sqrt(2) + 1e-6


def test_pixel_norm_gives_unit_magnitude_per_pixel():
    x = torch.randn(2, 32, 4, 4) * torch.tensor([0.01, 1.0, 300.0]).repeat(11)[:32, None, None]
    per_pixel = normalize(x * 7, dim=1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(per_pixel, torch.ones_like(per_pixel), rtol=0, atol=1e-3)


def test_mpconv_preserves_magnitude_at_init():
    """Each output channel's effective weight has norm 1 (times gain), so unit-variance input gives unit RMS."""
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    linear = MPConv(512, 384, kernel=[])
    assert linear.weight.std().item() == pytest.approx(1, rel=0.01)  # N(0, 1) at init; norm applied at use.
    assert rms(linear(x)) == pytest.approx(1, abs=0.01)
    assert rms(linear(x, gain=0.25)) == pytest.approx(0.25, abs=0.003)
    conv = MPConv(128, 64, kernel=[3, 3])
    y = conv(torch.randn(8, 128, 20, 20))
    assert rms(y[:, :, 1:-1, 1:-1]) == pytest.approx(1, abs=0.01)  # Away from the zero padding.


def test_forced_weight_normalization():
    """Training mode rescales the stored weight in place (Eq. 66): after an optimizer step, the next forward
    leaves every output row w_i with norm sqrt(fan_in) ||w_i|| / (||w_i|| + eps sqrt(fan_in)) (eps = 1e-4), i.e.
    unit RMS to within eps. Evaluation mode leaves the weight alone."""
    torch.manual_seed(0)
    conv = MPConv(16, 8, kernel=[3, 3]).train()
    fan_in = 16 * 9
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.5)
    x = torch.randn(4, 16, 6, 6)
    conv(x).square().mean().backward()
    optimizer.step()
    before = conv.weight.detach().clone()
    before_norms = before.flatten(1).norm(dim=1)
    assert (before_norms / math.sqrt(fan_in) - 1).abs().max() > 0.01  # The step moved the norms.
    conv(x)
    after_norms = conv.weight.detach().flatten(1).norm(dim=1)
    expected = math.sqrt(fan_in) * before_norms / (before_norms + 1e-4 * math.sqrt(fan_in))
    torch.testing.assert_close(after_norms, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(after_norms, torch.full([8], math.sqrt(fan_in)), rtol=2e-4, atol=0)
    # The direction of each row is kept.
    torch.testing.assert_close(conv.weight.detach(), before * (expected / before_norms)[:, None, None, None])

    conv.eval()
    with torch.no_grad():
        conv.weight.mul_(3)
    kept = conv.weight.detach().clone()
    conv(x)
    assert torch.equal(conv.weight.detach(), kept)


def test_gains_start_at_zero():
    """A fresh network's output layer has gain 0, so D = c_skip x exactly (and F = 0); each block's embedding
    gain is 0, so a fresh block ignores the embedding."""
    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=8).eval()
    gains = {name: p for name, p in net.named_parameters() if name.endswith("_gain")}
    assert len(gains) == 1 + 10 and all(p.item() == 0 for p in gains.values())
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 4.0])
    with torch.no_grad():
        D, logvar = net(x, sigma, torch.eye(3)[[0, 2]], return_logvar=True)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.equal(D, c_skip.reshape(-1, 1, 1, 1) * x)
    assert logvar.abs().min() > 0  # u(sigma) has no gain: it starts random.

    block = EDM2Block(8, 8, emb_channels=16, flavor="enc", attention=True, channels_per_head=4).eval()
    h = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(h, torch.randn(2, 16)), block(h, torch.randn(2, 16)), rtol=0, atol=0)
        block.emb_gain.fill_(1)
        assert not torch.allclose(block(h, torch.randn(2, 16)), block(h, torch.randn(2, 16)))


def test_resampling_is_a_2x2_box_filter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)
    torch.testing.assert_close(resample(x, mode="down"), x.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5)))
    torch.testing.assert_close(resample(x, mode="up"), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert resample(x, mode="keep") is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["down", "up"])
def test_box_resampling_equals_the_filters_convolution(dtype, memory_format, mode):
    """The 2x2 box's pooling / repetition gives the grouped convolution's values and input gradients (the
    official way; up exactly, down to one rounding of the result)."""
    from training.networks.edm2 import _resample_box, _resample_fir

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8).to(dtype).contiguous(memory_format=memory_format)
    outputs, grads = [], []
    for resampled in (lambda y: _resample_box(y, mode), lambda y: _resample_fir(y, (1, 1), mode)):
        y = x.clone().requires_grad_()
        out = resampled(y)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
        outputs.append(out.float())
        grads.append(y.grad.float())
    exact = mode == "up" or dtype == torch.float32
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(outputs[0], outputs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **(dict(rtol=2 ** -8, atol=1e-6) if dtype != torch.float32 else {}))


def test_resampling_kernel_is_made_once_per_device_and_serves_training_after_inference():
    """The FIR kernel is built once per device (built anew at every call, its copy from the host would make the host
    wait for a CUDA device; test_cuda counts those waits); built first under inference mode, it still serves a
    training step's backward; the [1, 3, 3, 1] filter down-samples by its normalized outer product."""
    from training.networks.edm2 import _fir_kernel

    _fir_kernel.cache_clear()
    x = torch.randn(1, 2, 8, 8)
    with torch.inference_mode():
        resample(x, taps=[1, 3, 3, 1], mode="down")
    y = x.clone().requires_grad_()
    resample(y, taps=[1, 3, 3, 1], mode="down").square().sum().backward()
    assert y.grad is not None and _fir_kernel.cache_info().misses == 1
    taps = torch.tensor([1.0, 3, 3, 1])
    kernel = (torch.outer(taps, taps) / 64).expand(2, 1, 4, 4)
    torch.testing.assert_close(resample(x, taps=[1, 3, 3, 1], mode="down"),
                               torch.nn.functional.conv2d(x, kernel, stride=2, padding=1, groups=2))
    assert _fir_kernel.cache_info().misses == 1


def test_activations_are_clipped():
    block = EDM2Block(4, 4, emb_channels=4, flavor="dec", clip_act=2).eval()
    with torch.no_grad():
        out = block(torch.randn(1, 4, 4, 4) * 100, torch.randn(1, 4))
    assert out.abs().max().item() == 2


@pytest.mark.parametrize("scale", [1, 50])
def test_clipping_gives_clamps_values_and_gradient(scale):
    """clip_activations gives in-place clamp's values and gradient (1 inside the limit, 0 outside and, as clamp_
    cannot tell a clipped value from one that was at the limit, 0 at the limit) whether or not a value exceeds
    the limit; with all inside, x itself comes back."""
    from training.networks.edm2 import clip_activations

    torch.manual_seed(0)
    x = (torch.rand(2, 4, 6, 6) * 4 - 2) * scale  # Scale 1: all inside [-2, 2]; 50: most outside.
    x[0, 0, 0, :2] = torch.tensor([2.0, -2.0])
    y = x.clone().requires_grad_()
    out = clip_activations(y * 1, 2)
    out.backward(torch.full_like(x, 3))
    torch.testing.assert_close(out, x.clamp(-2, 2), rtol=0, atol=0)
    torch.testing.assert_close(y.grad, 3 * (x.abs() < 2).float(), rtol=0, atol=0)
    inside = x.clamp(-1.5, 1.5)
    assert clip_activations(inside, 2) is inside

# ----------------------------------------------------------------------------
# Pickles: official EDM2 pickles load here; ours load in the official loader.


def official_edm2_pickle(net: torch.nn.Module, encoder: str = "StandardRGBEncoder") -> bytes:
    """A snapshot as the official EDM2 code writes it: an EasyDict of encoder, dataset_kwargs, loss_fn and the
    network in float16 without grad, every persistent object stored with the source of its official module."""
    import dnnlib
    ema = net.to(torch.float16).requires_grad_(False)
    encoder_state = dict(_init_args=(), _init_kwargs={})
    if encoder == "StabilityVAEEncoder":  # Its state holds numpy arrays and a dropped VAE.
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        encoder_state.update(vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                             bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale, batch_size=8,
                             _vae=None)
    loss_kwargs = dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5)
    data = dnnlib.EasyDict(
        encoder=_OfficialPersistentObject(dict(type="class", version=6, module_src="raise SystemExit",
                                               class_name=encoder, state=encoder_state)),
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip",
                                       use_labels=True, max_size=np.int64(1281167)),
        loss_fn=_OfficialPersistentObject(dict(type="class", version=6, module_src="raise SystemExit",
                                               class_name="EDM2Loss",
                                               state=dict(_init_args=(), _init_kwargs=loss_kwargs, **loss_kwargs))),
        ema=as_official(ema, OFFICIAL_MODULE_SRC))
    return pickle.dumps(data, protocol=4)


def test_official_pickle_loads_and_computes_official_outputs(golden, tmp_path):
    """The official format (float16 EMA network) loads through the safe loader as our classes; in float32 it
    computes what our float32 network with the same float16-rounded weights computes."""
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    path.write_bytes(official_edm2_pickle(golden_net(golden)))
    snapshot = load_network_pkl(str(path))
    net = snapshot["ema"]
    assert type(net) is EDM2Precond and type(net.unet.enc["8x8_block0"]) is EDM2Block
    assert net.unet.out_gain.dtype == torch.float16 and not net.training
    assert not is_latent_snapshot(snapshot) and snapshot["dataset_kwargs"]["max_size"] == 1281167
    assert type(snapshot["encoder"]) is StandardRGBEncoder  # The official class, ours, loaded with no code run.
    loss_fn = snapshot["loss_fn"]
    assert getattr(loss_fn, "class_name", type(loss_fn).__name__) == "EDM2Loss"

    rounded = {name: t.to(torch.float16).to(torch.float32) for name, t in golden["state_dict"].items()}
    D_ref, logvar_ref = run(golden_net(golden, rounded), golden)
    D, logvar = run(net, golden)
    assert D.dtype == torch.float32
    # The official code divides a float16 gain by sqrt(fan_in) in float16 (see the next test): 1e-4, not 1e-5.
    assert relative_error(D, D_ref) < 1e-4 and relative_error(logvar, logvar_ref) < 1e-4
    assert relative_error(D, golden["D"]) < 1e-2  # float16 weights: close to the float32 outputs, not equal.


def test_float16_gain_is_divided_by_sqrt_fan_in_in_float16_as_officially():
    """Official float16 snapshots: w / ||w|| * float16(gain / sqrt(fan_in)), the factor rounded to float16."""
    torch.manual_seed(0)
    conv = MPConv(7, 5, [3, 3]).eval()
    x = torch.randn(2, 7, 6, 6)
    gain = torch.tensor(0.7316, dtype=torch.float16)
    rms = conv.weight.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) / math.sqrt(63)
    w = conv.weight / (rms + 1e-4)  # Unit RMS per output channel (eps 1e-4).
    factor = (gain / math.sqrt(63)).to(torch.float32)
    exact = gain.to(torch.float32) / math.sqrt(63)
    assert abs(factor / exact - 1) > 1e-4  # The rounding this test is about.
    expected = torch.nn.functional.conv2d(x, w * factor, padding=1)
    torch.testing.assert_close(conv(x, gain), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conv(x, gain), torch.nn.functional.conv2d(x, w * exact, padding=1), rtol=1e-5, atol=1e-5)


def test_official_latent_pickle_loads(golden, tmp_path):
    """An img512-style snapshot (StabilityVAEEncoder, whose state holds numpy arrays) loads, its encoder as our class
    with the official scale and bias; it is flagged as working on latents."""
    path = tmp_path / "phema-0000000-0.100.pkl"
    path.write_bytes(official_edm2_pickle(golden_net(golden), encoder="StabilityVAEEncoder"))
    snapshot = load_network_pkl(str(path))
    assert type(snapshot["ema"]) is EDM2Precond and is_latent_snapshot(snapshot)
    encoder = snapshot["encoder"]
    assert type(encoder) is StabilityVAEEncoder and encoder.vae_name == "stabilityai/sd-vae-ft-mse"
    assert encoder._vae is None and encoder.batch_size == 8
    assert np.array_equal(encoder.scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
    assert np.array_equal(encoder.bias, -np.float32([5.81, 3.25, 0.12, -2.15]) * encoder.scale)


def test_hostile_pickle_with_edm2_class_names_is_refused(golden, tmp_path):
    class CallsSystem:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    wrapped = as_official(golden_net(golden), OFFICIAL_MODULE_SRC)
    wrapped.meta["state"]["sigma_data"] = CallsSystem()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(dict(ema=wrapped, loss_fn=None), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refusing to load: the pickle references '\w+\.system'"):
        load_network_pkl(str(path))
    assert not (tmp_path / "pwned").exists()


def _to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Space-to-depth written out: channel c * p^2 + a * p + b at (i, j) is pixel (p i + a, p j + b) of channel c."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(n, c * p * p, h // p, w // p)


def _from_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    n, cpp, h, w = x.shape
    return x.reshape(n, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, cpp // (p * p), h * p, w * p)


def test_patches_are_space_to_depth_around_the_same_unet():
    """patch_size=2 on 2 x 16 x 16 images is the U-Net of 8 x 8 x 8 images (same weights, same names) between
    space-to-depth and its inverse, written out here independently; the output keeps each pixel's place."""
    kwargs = dict(label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                  use_fp16=False)
    torch.manual_seed(0)
    patched = EDM2Precond(img_resolution=16, img_channels=2, patch_size=2, **kwargs).eval()
    plain = EDM2Precond(img_resolution=8, img_channels=8, **kwargs).eval()
    with torch.no_grad():
        for param in patched.parameters():
            param.normal_()  # Nonzero gains, so that the output depends on the U-Net.
    assert patched.unet.enc["8x8_conv"].weight.shape == (8, 9, 3, 3)
    assert patched.unet.out_conv.weight.shape == (8, 8, 3, 3) and "4x4_block0" in patched.unet.dec
    assert patched.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(patched.state_dict())
    x, sigma = torch.randn(3, 2, 16, 16), torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(3)
    with torch.no_grad():
        D = patched(x, sigma, labels)
        D_plain = plain(_to_patches(x, 2), sigma, labels)
    assert D.shape == x.shape
    torch.testing.assert_close(_to_patches(D, 2), D_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(_from_patches(_to_patches(x, 2), 2), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch_size=3 must divide img_resolution=16"):
        EDM2Precond(img_resolution=16, img_channels=2, patch_size=3, **kwargs)


def test_precond_name_means_edm2():
    """'Precond' in a pickle is EDM2's; our EDM preconditioners' base class of that name is never pickled."""
    from training.networks import Precond as EDMBase
    from training.networks import EDMPrecond
    assert persistence.registered_class("Precond") is EDM2Precond
    assert persistence.registered_class("EDMPrecond") is EDMPrecond and issubclass(EDMPrecond, EDMBase)
    assert not persistence.is_persistent(EDMBase.__new__(EDMBase))


OFFICIAL_CHILD = """
import pickle, sys, torch
import torch_utils.persistence
assert torch_utils.persistence.__file__.startswith(sys.path[0])
jobs = torch.load("jobs.pt", weights_only=True)
results = []
for job in jobs:
    with open(job["snapshot"], "rb") as f:
        net = pickle.load(f)["ema"]
    with torch.no_grad():
        D, logvar = net(job["x"], job["sigma"], job["labels"], return_logvar=True)
        D_repickled = pickle.loads(pickle.dumps(net))(job["x"], job["sigma"], job["labels"])
    results.append(dict(net_class=type(net).__name__, unet_class=type(net.unet).__name__, D=D, logvar=logvar,
                        D_repickled=D_repickled))
torch.save(results, "results.pt")
"""


def test_our_snapshot_opens_in_the_official_loader(golden, tmp_path):
    """Our EDM2 snapshot carries a self-contained module text (its own bundle, separate from EDM's, whose base
    class is also named Precond) that the official loader executes; the network there computes our outputs."""
    net = golden_net(golden)
    path = tmp_path / "network-snapshot-edm2.pkl"
    save_network_pkl(str(path), dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    _, (meta,) = net.__reduce__()
    assert meta["class_name"] == "Precond" and "class VPPrecond" not in meta["module_src"]

    root = tmp_path / "official"
    shutil.copytree(os.path.join(FIXTURES, "official_loader"), root)
    (root / "edm2_child.py").write_text(OFFICIAL_CHILD)
    torch.save([dict(snapshot=str(path), x=golden["x"], sigma=golden["sigma"], labels=golden["labels"])],
               root / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | dict(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "edm2_child.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (theirs,) = torch.load(root / "results.pt", weights_only=True)
    assert (theirs["net_class"], theirs["unet_class"]) == ("Precond", "UNet")
    D, logvar = run(load_network_pkl(str(path))["ema"], golden)
    torch.testing.assert_close(theirs["D"], D, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs["logvar"], logvar, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs["D_repickled"], D, rtol=1e-6, atol=1e-6)
    assert relative_error(theirs["D"], golden["D"]) < 1e-5
