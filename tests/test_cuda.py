"""The CUDA paths, on a GPU when the machine has one (CI has none: there these tests skip).

On a GPU machine: ``python -m pytest -q tests/test_cuda.py``. ``EDM_TEST_DEVICE=cpu`` runs the checks that are not
CUDA-specific on the CPU instead, which tests the tests. Float32 results must match the official test vectors
and the CPU's float32 reference up to float32 rounding (TF32 off), the reduced-precision fast paths within their
stated tolerances (README, Performance), and neither the training step nor the sampler loop may make the host
wait for the device.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from benchmarks.suite import relative_error
from conftest import FIXTURES, build_official_case, make_tiny_net, outputs_and_grads, random_tiny_net, tiny_inputs, \
    tiny_training_run
from training.networks import self_attention
from training.networks.edm2 import Precond as EDM2Precond
from training.perf import REFERENCE, parse_variant, set_tf32
from training.sampling import (Churn, PaperSampler, SeedRNG, draw_class_labels, draw_latents, edm_sampler,
                               generate_images, guided)

DEVICE = os.environ.get("EDM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (EDM_TEST_DEVICE=cpu runs these on the CPU)")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only")


@pytest.fixture(autouse=True)
def ieee_float32():
    """Float32 means float32 in every test (TF32 is PyTorch's default for cuDNN convolutions), and cuDNN picks
    its algorithms by heuristics, not by timing (the training loop's setup turns benchmarking on)."""
    benchmark = torch.backends.cudnn.benchmark
    set_tf32(False)
    yield
    set_tf32(False)
    torch.backends.cudnn.benchmark = benchmark


def _to(x, device=DEVICE):
    return x.to(device) if isinstance(x, torch.Tensor) else x


@pytest.fixture(scope="module")
def edm2_golden() -> dict:
    """The official EDM2 code's outputs for a small network, and its guided sampler's images (tests/fixtures)."""
    return torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)


def _edm2_net(init_kwargs: dict, state_dict: dict, **changes) -> EDM2Precond:
    net = EDM2Precond(**dict(init_kwargs, **changes)).eval()
    net.load_state_dict(state_dict, strict=True)
    return net.to(DEVICE)


@pytest.mark.parametrize("case_name", ["EDMPrecond-DDPM++-cond", "VPPrecond-DDPM++-uncond", "EDMPrecond-ADM-cond"])
def test_official_outputs_on_the_device(official_vectors, case_name):
    case = official_vectors[case_name]
    net = build_official_case(case).to(DEVICE)
    with torch.no_grad():
        model_kwargs = {name: _to(value) for name, value in case["model_kwargs"].items()}
        D = net(_to(case["x"]), _to(case["sigma"]), _to(case["class_labels"]), **model_kwargs)
    assert D.dtype == torch.float32
    assert relative_error(D.cpu(), case["D"]) < 2e-5  # TF32 would give ~1e-3.


def test_edm_sampler_reproduces_the_official_images_on_the_device(official_vectors):
    case = official_vectors["EDMPrecond-DDPM++-cond"]
    golden = case["edm_sampler"]
    net = build_official_case(case).to(DEVICE)
    with torch.no_grad():
        images = edm_sampler(net, _to(golden["latents"]), _to(golden["class_labels"]), num_steps=golden["num_steps"])
    torch.testing.assert_close(images.cpu(), golden["images_float"], rtol=0, atol=1e-4)


CHURN = PaperSampler(num_steps=4, churn=Churn(S_churn=20))


def test_a_seed_gives_the_same_image_in_any_batch_on_the_device():
    """Per-seed generators on the device: the batch a seed shares changes its image by at most one uint8 level
    in a few pixels (convolution algorithms may depend on the batch size)."""
    net = make_tiny_net().to(DEVICE)
    seeds = [0, 1, 2, 3, 4, 5]
    whole = generate_images(net, seeds, sampler=CHURN).cpu()
    parts = torch.cat([generate_images(net, seeds[i:i + 2], sampler=CHURN).cpu() for i in (0, 2, 4)])
    difference = (whole.int() - parts.int()).abs()
    assert difference.max() <= 1 and (difference > 0).double().mean() < 1e-2
    assert len({tuple(image.flatten()[:16].tolist()) for image in whole}) == len(seeds)  # Seeds differ.


@pytest.mark.parametrize("precision, tolerance", [("fp32", 2e-5), ("fp16", 5e-3), ("bf16", 2e-2)])
def test_edm2_official_outputs_on_the_device(edm2_golden, precision, tolerance):
    """The official EDM2 network's D(x; sigma) on the device: float32 up to float32 rounding, the official float16
    U-Net (``use_fp16``, CUDA only) and our bfloat16 one within their tolerances; u(sigma) is float32 in all three."""
    if precision == "fp16" and not ON_CUDA:
        pytest.skip("use_fp16 takes effect on CUDA only")
    g = edm2_golden
    net = _edm2_net(g["init_kwargs"], g["state_dict"], use_fp16=precision == "fp16", use_bf16=precision == "bf16")
    with torch.no_grad():
        D, logvar = net(_to(g["x"]), _to(g["sigma"]), _to(g["labels"]), return_logvar=True)
    assert D.dtype == logvar.dtype == torch.float32
    error = relative_error(D.cpu(), g["D"])
    assert error < tolerance, error
    assert relative_error(logvar.cpu(), g["logvar"]) < 2e-5
    if precision != "fp32":
        assert error > 1e-6  # The U-Net did run in reduced precision.


def test_edm2_guided_sampler_reproduces_the_official_images_on_the_device(edm2_golden):
    """Autoguidance (w = 2, a smaller guide, 6 Heun steps) on the device; the seeds' noise and classes are drawn
    on the CPU as the golden images' were."""
    g = edm2_golden["guided"]
    net = _edm2_net(edm2_golden["init_kwargs"], edm2_golden["state_dict"])
    gnet = _edm2_net(g["gnet_init_kwargs"], g["gnet_state_dict"])
    rng = SeedRNG(g["seeds"])
    latents, labels = draw_latents(net, rng), draw_class_labels(net, rng)
    with torch.no_grad():
        images = edm_sampler(guided(net, gnet, g["guidance"]), _to(latents), _to(labels), num_steps=g["num_steps"])
    assert images.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(images.cpu().float(), g["images"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant, output_tolerance", [("default", 1e-5), ("default+tf32", 2e-3),
                                                      ("default+bf16", 2e-2), ("default+fp16", 5e-3)])
def test_fast_paths_on_the_device(variant, output_tolerance):
    """D(x; sigma) of a random network with each fast path on the device against the reference (float32, the
    official way) on the CPU; the float32 gradients too."""
    fast = parse_variant(variant, DEVICE)
    if fast.precision == "fp16" and not ON_CUDA:
        pytest.skip("fp16 runs on CUDA only")
    if fast.tf32 and not ON_CUDA:
        pytest.skip("TF32 is a CUDA switch")
    D_ref, grads_ref = outputs_and_grads(random_tiny_net(), REFERENCE)
    set_tf32(fast.tf32)
    D, grads = outputs_and_grads(random_tiny_net(fast).to(DEVICE), fast, device=DEVICE)
    error = relative_error(D, D_ref)
    assert error < output_tolerance, error
    if fast.precision == "fp32" and not fast.tf32:
        for name in grads_ref:
            assert relative_error(grads[name], grads_ref[name]) < 1e-4, name


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_runs_a_fused_kernel_on_the_device(dtype):
    """The official CIFAR-10 DDPM++ attention (256 channels, one head, 16x16, batch 8) is accepted by a fused
    kernel (flash, memory-efficient or cuDNN; the unfused math fallback is ruled out), forward and backward, and
    agrees with the explicit softmax."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn([8, 256, 256], generator=g, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(3))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        out = self_attention(q, k, v, "sdpa")
        out.float().square().sum().backward()
    expected = self_attention(*(t.detach().float() for t in (q, k, v)), "einsum")
    assert relative_error(out.detach().float(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def _count_syncs(run) -> int:
    """How many times ``run()`` makes the host wait for the device (CUDA's sync debug mode reports each)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_the_training_loop_steps_on_the_device(tmp_path, fashion_mnist_16_zip):
    from training.loop.step import train_step

    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, DEVICE, workers=1)
    before = [p.detach().clone() for p in run.state.net.parameters()]
    for _ in range(3):
        train_step(run)
    after = list(run.state.net.parameters())
    assert all(p.device.type == torch.device(DEVICE).type for p in after) and run.state.cur_nimg == 24
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))


@cuda_only
def test_the_training_step_never_waits_for_the_device(tmp_path, fashion_mnist_16_zip):
    """The loop's train_step (data, loss, backward, gradient clean-up, fused Adam, EMA, statistics) makes no
    synchronising CUDA call once the optimizer has its state."""
    from training.loop.step import train_step

    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, DEVICE, workers=1)
    train_step(run)
    assert _count_syncs(lambda: [train_step(run) for _ in range(2)]) == 0


TINY_EDM2 = dict(class_name="training.networks.edm2.Precond", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], dropout=0.1)


def _edm2_training_run(run_dir: str, data: str, precision: str):
    """The loop's Run for a tiny EDM2 network with the learned-uncertainty loss, the learning-rate decay, label
    dropout and two power-function EMAs; precision 'fp16' is the official default (``use_fp16``, CUDA)."""
    network = dict(TINY_EDM2, use_fp16=precision == "fp16", use_bf16=precision == "bf16")
    return tiny_training_run(run_dir, data, DEVICE, workers=1, network_kwargs=network,
                             loss_kwargs=dict(class_name="training.loss.EDM2Loss", P_mean=-0.8, P_std=1.6),
                             lr_decay_batches=2, ema_stds=[0.05, 0.1], label_dropout=0.2)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_edm2_training_steps_on_the_device(tmp_path, fashion_mnist_16_zip, precision):
    """EDM2 in the loop's train_step on the device: the weights move and stay finite, and after every step each
    power-function EMA is beta * ema + (1 - beta) * net, beta = (1 - batch / n)^(gamma + 1)."""
    from test_edm2_training import gamma_of
    from training.loop.step import train_step

    if precision == "fp16" and not ON_CUDA:
        pytest.skip("use_fp16 takes effect on CUDA only")
    run = _edm2_training_run(str(tmp_path), fashion_mnist_16_zip, precision)
    initial = [p.detach().clone() for p in run.state.net.parameters()]
    expected = {std: None for std in (0.05, 0.1)}
    for _ in range(3):
        train_step(run)
        n, net = run.state.cur_nimg, [p.detach().clone() for p in run.state.net.parameters()]
        for std, ema in expected.items():
            beta = (1 - 8 / n) ** (gamma_of(std) + 1)
            expected[std] = net if ema is None else [beta * e + (1 - beta) * p for e, p in zip(ema, net)]
    for std, want in expected.items():
        for w, got in zip(want, run.state.phema.emas[std].parameters()):
            assert got.device == w.device and got.device.type == torch.device(DEVICE).type
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    after = list(run.state.net.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, initial))


@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_edm2_training_step_never_waits_for_the_device(tmp_path, fashion_mnist_16_zip, precision):
    """EDM2's step (forced weight normalization, learned uncertainty, decayed learning rate, label dropout and
    the power-function EMAs) makes no synchronising CUDA call once the optimizer has its state."""
    from training.loop.step import train_step

    run = _edm2_training_run(str(tmp_path), fashion_mnist_16_zip, precision)
    train_step(run)
    assert _count_syncs(lambda: [train_step(run) for _ in range(2)]) == 0


@cuda_only
@pytest.mark.parametrize("network", ["ddpm++", "edm2"])
def test_the_sampler_loop_never_waits_for_the_device(edm2_golden, network):
    """Syncs happen only before the loop (the noise levels decided on the host): as many for 3 steps as for 6."""
    if network == "edm2":
        net = _edm2_net(edm2_golden["init_kwargs"], edm2_golden["state_dict"], use_fp16=True)
        x, labels = _to(edm2_golden["x"][:2]), _to(edm2_golden["labels"][:2])
    else:
        net = random_tiny_net(parse_variant("default", DEVICE)).to(DEVICE).eval()
        x, _, labels = (t.to(DEVICE) for t in tiny_inputs(2))
    with torch.no_grad():
        counts = [_count_syncs(lambda: edm_sampler(net, x, labels, num_steps=steps, S_churn=10, S_min=0.1, S_max=5))
                  for steps in (3, 6)]
    assert counts[0] == counts[1] <= 2, counts


@cuda_only
def test_the_data_stream_delivers_pinned_batches(tmp_path):
    from benchmarks.suite import CONFIGS, write_random_dataset
    from training.data.dataset import ImageFolderDataset
    from training.loop.setup import data_loader_kwargs, open_data_stream

    path = write_random_dataset(str(tmp_path / "random.zip"), CONFIGS["tiny"], size=32, seed=0)
    stream = open_data_stream(ImageFolderDataset(path, use_labels=True), 0, 0, 8,
                              data_loader_kwargs(torch.device(DEVICE), workers=1))
    images, labels = next(stream)
    assert images.is_pinned() and labels.is_pinned() and list(images.shape) == [8, 3, 16, 16]
    on_device = images.to(DEVICE, non_blocking=True)
    assert torch.equal(on_device.cpu(), images)


def test_fid_features_on_the_device_match_the_cpu():
    """The detector's float32 features on the device equal the CPU's up to float32 rounding, even with TF32
    switched on by the user (the detector turns it off for its convolutions)."""
    from metrics.inception import ConvBN, FIDDetector, InceptionV3

    detector = FIDDetector(InceptionV3())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, ConvBN):  # He-initialised, so the features are far from zero.
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2 / module.weight[0].numel()) ** 0.5)
    images = torch.randint(0, 256, [4, 3, 32, 32], generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = detector(images)
    detector_on_device = FIDDetector(InceptionV3())
    detector_on_device.load_state_dict(detector.state_dict())
    set_tf32(True)
    features = detector_on_device.to(DEVICE)(images.to(DEVICE)).cpu()
    assert expected.abs().mean() > 1e-3 and relative_error(features, expected) < 1e-4
