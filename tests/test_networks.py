"""Networks: official test vectors, official layouts, every architecture option, reduced precision."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_official_case
from torch_utils.misc import randomize_parameters
from training import networks
from training.networks import EDMPrecond, SongUNet, UNetBlock, self_attention
from training.networks.layers import make_resample_filter, resample


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case_name", ["EDMPrecond-DDPM++-cond", "VPPrecond-DDPM++-uncond", "EDMPrecond-ADM-cond"])
def test_reproduces_official_outputs(official_vectors, case_name):
    case = official_vectors[case_name]
    net = build_official_case(case)
    with torch.no_grad():
        D = net(case["x"], case["sigma"], case["class_labels"], **case["model_kwargs"])
    assert D.dtype == torch.float32
    # Float32 rounding: a few ulps of the output's magnitude.
    torch.testing.assert_close(D, case["D"], rtol=1e-5, atol=1e-5 * case["D"].abs().max().item())


@pytest.mark.parametrize("case_name", ["EDMPrecond-NCSN++-cond", "EDMPrecond-SongUNet-skip-skip"])
def test_reproduces_official_songunet_variants(case_name):
    """NCSN++ (Fourier embedding, residual progressive input, [1,3,3,1] filters) and the skip encoder/decoder
    paths against outputs the official networks.py computed once (tests/fixtures/official-songunet-vectors.pt,
    random weights, 16x16, attention at 8x8)."""
    import os

    from conftest import FIXTURES
    case = torch.load(os.path.join(FIXTURES, "official-songunet-vectors.pt"), weights_only=True)[case_name]
    net = build_official_case(case)
    with torch.no_grad():
        D = net(case["x"], case["sigma"], case["class_labels"], **case["model_kwargs"])
    torch.testing.assert_close(D, case["D"], rtol=1e-5, atol=1e-5 * case["D"].abs().max().item())


@pytest.mark.parametrize("config", [
    "cifar10-32x32-cond-vp (DDPM++, EDMPrecond)",
    "cifar10-32x32-uncond-ve (NCSN++, EDMPrecond)",
    "ffhq-64x64-uncond-vp (DDPM++, EDMPrecond)",
    "imagenet-64x64-cond-adm (ADM, EDMPrecond)",
    "baseline VP (DDPM++, VPPrecond)",
    "baseline VE (NCSN++, VEPrecond)",
    "baseline ADM (iDDPMPrecond)",
])
def test_official_layout(official_layouts, config):
    spec = official_layouts[config]
    with torch.device("meta"):
        net = getattr(networks, spec["class_name"])(**spec["init_kwargs"])
    layout = [f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in net.state_dict().items()]
    assert layout == spec["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == spec["num_parameters"]


def test_official_state_dict_loads_strictly(official_vectors):
    case = official_vectors["EDMPrecond-ADM-cond"]
    net = getattr(networks, case["class_name"])(**case["init_kwargs"])
    result = net.load_state_dict(case["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_interface_attributes(official_vectors):
    net = build_official_case(official_vectors["EDMPrecond-DDPM++-cond"])
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (16, 3, 10, False)
    assert (net.sigma_min, net.sigma_max) == (0, float("inf"))
    assert torch.equal(net.round_sigma(torch.tensor([0.3, 2.0])), torch.tensor([0.3, 2.0]))


def test_scalar_sigma_broadcasts_over_batch(official_vectors):
    case = official_vectors["EDMPrecond-DDPM++-cond"]
    net = build_official_case(case)
    x, labels, aug = case["x"], case["class_labels"], case["model_kwargs"]["augment_labels"]
    with torch.no_grad():
        per_image = net(x, torch.full([3], 1.7), labels, augment_labels=aug)
        scalar = net(x, 1.7, labels, augment_labels=aug)
    torch.testing.assert_close(scalar, per_image, rtol=1e-6, atol=1e-6)


def test_attention_matches_softmax_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10).unbind(0)  # [batch*heads, channels, positions]
    weights = torch.einsum("ncq,nck->nqk", q, k / 2.0).softmax(dim=2)  # 1/sqrt(c), c = 4
    expected = torch.einsum("nqk,nck->ncq", weights, v)
    torch.testing.assert_close(self_attention(q, k, v), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_resampling_filters(taps):
    """2x FIR resampling: the box filter [1, 1] is 2x2 average pooling down and pixel repetition up; in bf16 on the
    CPU the filter runs in float32 (PyTorch's bf16 depthwise kernels are slow there) and rounds once."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    f = make_resample_filter(taps)
    pad = (len(taps) - 1) // 2
    if taps == [1, 1]:
        torch.testing.assert_close(resample(x, f, up=False, padding=pad), torch.nn.functional.avg_pool2d(x, 2))
        repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(resample(x, f, up=True, padding=pad), repeated)
    for up in (False, True):
        down_or_up = resample(x, f, up=up, padding=pad)
        assert down_or_up.shape[-1] == (16 if up else 4) and resample(x.double(), f, up, pad).dtype == torch.float64
        with ConvolutionDtypes() as seen:
            in_bf16 = resample(x.bfloat16(), f, up, pad)
        assert seen.dtypes == [torch.float32] and in_bf16.dtype == torch.bfloat16
        assert torch.equal(in_bf16, resample(x.bfloat16().float(), f, up, pad).bfloat16())


class ConvolutionDtypes(TorchDispatchMode):
    """Records the input dtype of every convolution that runs inside the ``with`` block."""

    def __enter__(self):
        self.dtypes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.convolution:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [
    dict(embedding_type="positional", encoder_type="standard", decoder_type="standard"),
    dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    dict(embedding_type="fourier", encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]),
    dict(encoder_type="standard", decoder_type="skip", label_dropout=0.1, dropout=0.2),
])
def test_song_unet_options(options):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, in_channels=2, out_channels=2, label_dim=4, augment_dim=9, model_channels=16,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], **options)
    randomize_parameters(net).eval()
    x = torch.randn(2, 2, 16, 16)
    noise = torch.tensor([0.1, -0.5])
    labels = torch.eye(4)[[0, 3]]
    with torch.no_grad():
        y = net(x, noise, labels, augment_labels=torch.zeros(2, 9))
        y_other_noise = net(x, noise + 1, labels, augment_labels=torch.zeros(2, 9))
        y_other_label = net(x, noise, torch.eye(4)[[1, 2]], augment_labels=torch.zeros(2, 9))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, y_other_noise) and not torch.allclose(y, y_other_label)
    if options.get("encoder_type") == "skip":
        assert any("aux_skip" in name for name in net.enc.keys())
    if options.get("decoder_type") == "skip":
        assert any("aux_up" in name for name in net.dec.keys())


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    net = randomize_parameters(SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=3,
                                        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                                        dropout=0, label_dropout=1.0))
    x, noise, labels = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.eye(3)[[0, 1]]
    with torch.no_grad():
        net.train()
        dropped = net(x, noise, labels)
        unlabeled = net(x, noise, torch.zeros(2, 3))
        net.eval()
        kept = net(x, noise, labels)
    torch.testing.assert_close(dropped, unlabeled)
    assert not torch.allclose(kept, unlabeled)


def test_unet_block_heads_follow_channels_per_head():
    block = UNetBlock(in_channels=128, out_channels=128, emb_channels=8, attention=True, channels_per_head=64)
    assert block.num_heads == 2
    assert UNetBlock(16, 16, 8, attention=True, num_heads=1).num_heads == 1
    assert UNetBlock(16, 16, 8, attention=False).num_heads == 0


def _F(net, case, dtype):
    """The raw network F evaluated as the preconditioner would, with its input in ``dtype``."""
    sigma = case["sigma"].reshape(-1, 1, 1, 1)
    _, _, c_in, c_noise = net.coefficients(sigma)
    labels = case["class_labels"]
    return net.model((c_in * case["x"]).to(dtype), c_noise.flatten(), labels, **case["model_kwargs"])


@pytest.mark.parametrize("case_name", ["EDMPrecond-DDPM++-cond", "EDMPrecond-ADM-cond"])
def test_reduced_precision_agrees_with_fp32(official_vectors, case_name):
    """fp16 (CUDA's use_fp16 path, run here on the CPU) and bf16 keep F within a few 1e-3 of fp32; D stays float32."""
    case = official_vectors[case_name]
    net = build_official_case(case)
    with torch.no_grad():
        F32 = _F(net, case, torch.float32)
        F16 = _F(net, case, torch.float16)
        BF16 = _F(net, case, torch.bfloat16)
        D32 = net(case["x"], case["sigma"], case["class_labels"], **case["model_kwargs"])
        net.use_bf16 = True
        D_bf16 = net(case["x"], case["sigma"], case["class_labels"], **case["model_kwargs"])
    assert F16.dtype == torch.float16 and BF16.dtype == torch.bfloat16
    assert _relative_error(F16, F32) < 3e-3
    assert _relative_error(BF16, F32) < 3e-2
    assert D_bf16.dtype == torch.float32
    assert _relative_error(D_bf16, D32) < 1e-2
    assert _relative_error(D_bf16, D32) > 0  # The bf16 path really ran in bf16.


def test_fp16_is_used_only_on_cuda_unless_forced_off(tiny_edm_net):
    net = tiny_edm_net
    net.use_fp16 = True
    x = torch.zeros(1, 3, 16, 16)
    assert net.compute_dtype(x) == torch.float32  # The official runs fp16 only on CUDA.
    net.use_bf16 = True
    assert net.compute_dtype(x) == torch.bfloat16
    assert net.compute_dtype(x, force_fp32=True) == torch.float32


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="encoder_type='bogus'"):
        SongUNet(img_resolution=8, in_channels=1, out_channels=1, encoder_type="bogus")
    with pytest.raises(ValueError, match="model_type='Transformer'"):
        EDMPrecond(img_resolution=8, img_channels=1, model_type="Transformer")


def test_tiny_network_fixture_runs(tiny_edm_net):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        D = tiny_edm_net(x, torch.tensor([0.5, 3.0]), torch.eye(10)[[1, 2]], augment_labels=torch.zeros(2, 9))
    assert D.shape == x.shape and D.dtype == torch.float32 and torch.isfinite(D).all()
