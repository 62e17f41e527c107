"""Fast paths (training/perf.py): each keeps the results of the official way (REFERENCE: fp32, contiguous,
einsum attention, for-loop Adam) within its stated tolerance; the sampler loop and the training step never
wait for the device; the benchmark measures and reports every variant."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from benchmarks.suite import relative_error
from conftest import outputs_and_grads, random_tiny_net, tiny_inputs, tiny_training_run
from training.networks import self_attention
from training.perf import REFERENCE, default_fast_paths, maybe_compile, parse_variant
from training.sampling import edm_sampler
from training.loop.setup import build_optimizer
from training.loop.step import update_ema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_thread")  # Small convolutions on a shared machine.


@pytest.mark.parametrize("fast", [REFERENCE.with_options(sdpa=True), REFERENCE.with_options(channels_last=True),
                                  REFERENCE.with_options(sdpa=True, channels_last=True)],
                         ids=["sdpa", "channels_last", "sdpa+channels_last"])
def test_float32_fast_paths_keep_outputs_and_gradients(fast):
    D_ref, grads_ref = outputs_and_grads(random_tiny_net(REFERENCE), REFERENCE)
    D, grads = outputs_and_grads(random_tiny_net(fast), fast)
    assert relative_error(D, D_ref) < 1e-5
    for name in grads_ref:
        assert relative_error(grads[name], grads_ref[name]) < 1e-4, name


def test_reduced_precision_stays_within_its_tolerance():
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        D_ref = random_tiny_net(REFERENCE)(x, sigma, labels)
        D_bf16 = random_tiny_net(REFERENCE.with_options(precision="bf16"))(x, sigma, labels)
        # fp16 is CUDA-only in Precond (as the official); the U-Net itself runs in half on the CPU too.
        net = random_tiny_net(REFERENCE)
        c_skip, c_out, c_in, c_noise = net.coefficients(sigma.reshape(-1, 1, 1, 1))
        F_ref = net.model(c_in * x, c_noise.flatten(), labels)
        F_fp16 = net.model((c_in * x).half(), c_noise.flatten(), labels).float()
    assert 1e-4 < relative_error(D_bf16, D_ref) < 2e-2  # It did run in bf16, and stayed close.
    assert 1e-5 < relative_error(F_fp16, F_ref) < 5e-3


def test_einsum_attention_is_the_softmax_formula_in_fp16_too():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 8, 12, dtype=torch.float64) * 2).unbind(0)
    expected = torch.einsum("nqk,nck->ncq", torch.einsum("ncq,nck->nqk", q, k / 8 ** 0.5).softmax(dim=2), v)
    for impl in ("sdpa", "einsum"):
        assert relative_error(self_attention(q.float(), k.float(), v.float(), impl), expected) < 1e-6
        out = self_attention(q.half(), k.half(), v.half(), impl)
        assert out.dtype == torch.float16 and relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_runs_fused_and_keeps_nchw(dtype):
    """The fused kernel takes only 4-D, channel-contiguous inputs (else PyTorch silently runs its unfused math
    fallback), and a transposed output would turn the rest of the U-Net channels_last."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 32, 64, dtype=dtype).unbind(0)
    with torch.profiler.profile() as prof:
        out = self_attention(q, k, v, "sdpa")
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::scaled_dot_product_attention" in kernels
    assert not any("math" in name for name in kernels), kernels
    assert out.is_contiguous()
    assert relative_error(out, self_attention(q, k, v, "einsum")) < (1e-6 if dtype == torch.float32 else 1e-2)

    net = random_tiny_net(default_fast_paths("cpu"))
    block = next(m for m in net.modules() if getattr(m, "num_heads", 0))
    x = torch.randn(2, block.in_channels, 8, 8)
    assert block(x, torch.randn(2, block.affine.in_features)).is_contiguous()


_PAGE_FAULTS_OF_REALLOCATED_TENSORS = """
import resource, sys, torch
from training.perf import process_settings, retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
assert process_settings()["retain_memory"] == (sys.argv[1] == "retain")
for _ in range(10):  # The heap grows to its working size.
    torch.ones(10 * 2 ** 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(10 * 2 ** 20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_stops_the_page_faults_of_reallocated_tensors():
    """glibc by default maps every block above 32 MB afresh and unmaps it when freed, so each new 40 MB tensor is
    page-faulted in again (10,240 faults); retained, it comes from the heap, which keeps its pages. (Smaller
    blocks fault or not depending on glibc's adaptive thresholds, i.e. on what the process did before.)"""
    faults = {}
    for mode in ("default", "retain"):
        run = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_OF_REALLOCATED_TENSORS, mode], capture_output=True,
                             text=True, cwd=REPO, check=True)
        faults[mode] = float(run.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["retain"] < 100, faults
    assert default_fast_paths("cpu").retain_memory and not default_fast_paths("cuda").retain_memory
    assert not REFERENCE.retain_memory


def test_loss_scaling_multiplies_the_loops_gradients(fashion_mnist_16_zip, tmp_path, single_thread):
    """The loop's accumulate_gradients gives the gradient of the batch-mean loss, and with --ls=s s times that on
    the same batch and noise (as the official: the loss is scaled and Adam, invariant to the scale, undoes it), so
    gradients that fp16 would flush to zero are lifted into its range."""
    from training.loop.step import accumulate_gradients

    grads = {}
    for scale in (1.0, 1024.0):
        run = tiny_training_run(str(tmp_path / f"ls{scale:g}"), fashion_mnist_16_zip, "cpu")
        run.config.loss_scaling = scale
        torch.manual_seed(7)  # The same sigma, noise and dropout draws in both runs.
        accumulate_gradients(run)
        grads[scale] = [p.grad.clone() for p in run.state.net.parameters()]
    for plain, scaled in zip(grads[1.0], grads[1024.0]):
        torch.testing.assert_close(scaled, 1024 * plain, rtol=1e-4, atol=1e-6 * 1024 * plain.abs().max().item())
    assert any(g.abs().max() > 0 for g in grads[1.0])

    # Independently: the gradient of the loss summed over the 8 images (two rounds of 4) divided by 8, the mean
    # over the batch (Adam hides a wrong constant factor from every training test, so it is pinned here).
    run = tiny_training_run(str(tmp_path / "by-hand"), fashion_mnist_16_zip, "cpu")
    torch.manual_seed(7)
    total = 0
    for _ in range(run.accumulation_rounds):
        images, labels = next(run.data)
        images = images.to(torch.float32) / 127.5 - 1
        total = total + run.loss_fn(net=run.state.net, images=images, labels=labels).sum()
    by_hand = torch.autograd.grad(total / run.config.batch_size, list(run.state.net.parameters()))
    assert run.accumulation_rounds == 2 and run.config.batch_size == 8
    for loop, expected in zip(grads[1.0], by_hand):
        torch.testing.assert_close(loop, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_fused_adam_matches_the_for_loop_adam():
    g = torch.Generator().manual_seed(0)
    shapes = [[16, 8, 3, 3], [16], [64, 32], [3]]
    params = [[torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in
               enumerate(shapes)] for _ in range(2)]
    kwargs = dict(class_name="torch.optim.Adam", lr=1e-2, betas=[0.9, 0.999], eps=1e-8)
    optimizers = [build_optimizer(kwargs, params[0], REFERENCE),
                  build_optimizer(kwargs, params[1], default_fast_paths("cpu"))]
    assert optimizers[0].defaults["foreach"] is False and optimizers[1].defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn(s, generator=g) * 10 ** torch.randint(-4, 2, [], generator=g).item() for s in shapes]
        for group, opt in zip(params, optimizers):
            for p, grad in zip(group, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b, start in zip(params[0], params[1], [torch.randn(s, generator=torch.Generator().manual_seed(i))
                                                   for i, s in enumerate(shapes)]):
        assert (a - start).abs().max() > 1e-2  # Five steps of about lr each moved the weights...
        assert (b - a).abs().max() < 1e-6      # ...and both implementations the same way.


def test_multi_tensor_ema_is_bit_identical_to_the_official_loop():
    ema, net = random_tiny_net(seed=1), random_tiny_net(seed=2)
    expected = [p_net.detach().lerp(p_ema, 0.93) for p_ema, p_net in zip(ema.parameters(), net.parameters())]
    update_ema(ema, net, 0.93)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), expected))


def test_network_compiles_as_one_graph_with_the_same_outputs():
    """torch.compile traces the whole denoiser without graph breaks (fullgraph), and AOTAutograd derives its
    backward as one joint graph, as for a --compile training step. The 'aot_eager' backend checks the tracing and the
    derived graphs, which is this code's part; inductor's kernels are checked below and by the benchmark (outputs
    within 1e-5 of eager on cifar10-ddpmpp-c32)."""
    fast = REFERENCE.with_options(sdpa=True, compile=True)
    D_ref, grads_ref = outputs_and_grads(random_tiny_net(fast), fast)
    net = random_tiny_net(fast)
    compiled = maybe_compile(net, fast, backend="aot_eager", fullgraph=True)
    assert compiled is not net and compiled.sigma_data == net.sigma_data  # Attributes pass through.
    try:
        x, sigma, labels = tiny_inputs()
        D = compiled(x, sigma, labels)
        D.square().mean().backward()
    finally:
        torch._dynamo.reset()
    assert relative_error(D.detach(), D_ref) < 1e-6
    assert all(relative_error(p.grad, grads_ref[name]) < 1e-5 for name, p in net.named_parameters())


def test_network_compiled_by_inductor_keeps_float32_results(tmp_path, monkeypatch):
    """The --compile fast path itself: inductor's generated CPU kernels for the denoiser (a one-level U-Net with
    attention, as sampling calls it) give the eager outputs up to float32 rounding. Inductor's backward kernels are
    the same code generator's; compiling them too would double the test's minute of C++ compilation, and the joint
    graph they come from is checked above."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # Compiled here, not loaded from a cache.
    fast = REFERENCE.with_options(sdpa=True, compile=True)
    net = random_tiny_net(fast, resolution=8, channel_mult=[1]).eval()
    x, sigma, labels = (t[:, :, 4:12, 4:12] if t.ndim == 4 else t for t in tiny_inputs())
    with torch.no_grad():
        D_ref = net(x, sigma, labels)
        try:
            D = maybe_compile(net, fast, fullgraph=True)(x, sigma, labels)
        finally:
            torch._dynamo.reset()
    assert list(tmp_path.rglob("*.py")) and list(tmp_path.rglob("*.so"))  # Inductor wrote and built kernels.
    assert relative_error(D, D_ref) < 1e-6 and relative_error(D, x) > 1e-2  # The U-Net's part is not negligible.


_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts calls of the Tensor methods that make the host wait for the device (on CUDA)."""
    counts = {"n": 0}
    for name in _SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_sampler_loop_never_waits_for_the_device(count_host_reads):
    """The host reads nothing from the device inside the loop: the count does not grow with the steps."""
    net = random_tiny_net(default_fast_paths("cpu")).eval()
    x, _, labels = tiny_inputs(2)
    counts = []
    with torch.no_grad():
        for steps in (3, 6):
            before = count_host_reads["n"]
            edm_sampler(net, x, labels, num_steps=steps, S_churn=10, S_min=0.1, S_max=5)
            counts.append(count_host_reads["n"] - before)
    assert counts[0] == counts[1] <= 2  # One copy of the noise levels to the host (.cpu, .tolist), before the loop.


def test_training_step_never_waits_for_the_device(count_host_reads, tmp_path, fashion_mnist_16_zip):
    """The loop's own train_step (data, loss, backward, gradient clean-up, fused Adam, EMA, statistics) reads
    nothing from the device."""
    from training.loop.step import train_step

    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, "cpu")
    for _ in range(2):
        count_host_reads["n"] = 0
        train_step(run)
        assert count_host_reads["n"] == 0


def test_variants_parse_and_name_their_errors():
    assert parse_variant("reference", "cpu") == REFERENCE
    assert parse_variant("default", "cpu") == default_fast_paths("cpu")
    assert parse_variant("default+bf16+no_sdpa", "cpu") == default_fast_paths("cpu", "bf16").with_options(
        precision="bf16", sdpa=False)
    assert parse_variant("channels_last+compile", "cuda").describe() == "channels_last+compile"
    assert default_fast_paths("cuda").channels_last and default_fast_paths("cpu").precision == "fp32"
    # On a CPU NHWC for EDM2's U-Net only, given as a class or an instance.
    from training.networks import EDMPrecond
    from training.networks.edm2 import Precond as EDM2Precond
    assert not default_fast_paths("cpu").channels_last and not default_fast_paths("cpu", EDMPrecond).channels_last
    assert default_fast_paths("cpu", EDM2Precond).channels_last and parse_variant("default", "cpu", EDM2Precond) == \
        default_fast_paths("cpu", EDM2Precond)
    with pytest.raises(ValueError, match="unknown part 'turbo'"):
        parse_variant("default+turbo", "cpu")


def test_benchmark_cli_writes_table_and_json(tmp_path, single_thread, fashion_mnist_16_zip):
    """Two variants side by side; each measurement of each runs in a process of its own, so the default's retained
    host memory (which glibc cannot switch off again) does not reach the reference+tf32 measured after it. Data
    loading, which no fast path changes, is measured once, with the first variant."""
    from click.testing import CliRunner

    from benchmarks.benchmark import main

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["--device=cpu", "--config=tiny", "--batch=2", "--steps=2", "--fid-batch=1",
                                       "--rounds=1", "--variants=default+channels_last,reference+tf32",
                                       "--measure=train,forward,sample,fid,data", f"--data={fashion_mnist_16_zip}",
                                       "--workers=1", f"--out={out}"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["default+channels_last", "reference+tf32"]
    for r in report["results"]:
        assert r["train_img_per_s"] > 0 and r["sample_img_per_s"] > 0 and r["forward_img_per_s"] > 0
        assert r["fid_img_per_s"] > 0 and r["train_s_per_kimg"] == pytest.approx(1000 / r["train_img_per_s"])
        assert r["peak_rss_gb"] > 0.05
    default, reference = report["results"]
    assert default["denoiser_rel_error"] is None and reference["denoiser_rel_error"] < 1e-5
    measurements = ["train", "forward", "sample", "fid"]
    assert default["process_settings"] == {m: dict(tf32=False, retain_memory=True) for m in [*measurements, "data"]}
    assert reference["process_settings"] == {m: dict(tf32=True, retain_memory=False) for m in measurements}
    assert default["data_img_per_s"] > 0 and reference["data_img_per_s"] is None
    assert report["data_loader"] == dict(img_per_s=default["data_img_per_s"], variant="default+channels_last",
                                         workers=1, pin_memory=False, cache=False, dataset=fashion_mnist_16_zip)
    assert "Data loader: " in result.output and "the fastest training step above" in result.output
    assert report["nfe"] == 3 and "| reference+tf32 |" in result.output
    bad = CliRunner().invoke(main, ["--device=cpu", "--config=tiny", "--variants=default+fp16", "--measure=forward"])
    assert bad.exit_code != 0 and "fp16 runs only on CUDA devices" in bad.output
    missing = CliRunner().invoke(main, ["--device=cpu", "--config=tiny", "--measure=data", f"--data={tmp_path}/no.zip"])
    assert missing.exit_code != 0 and "no.zip': no such dataset ZIP or folder" in missing.output


def test_benchmark_random_dataset_reads_as_the_training_data(tmp_path):
    """The data measurement's default dataset: random images of the config's shape with labels, in the format
    dataset_tool.py writes, read by the training loop's dataset class."""
    from benchmarks.suite import CONFIGS, write_random_dataset
    from training.data.dataset import ImageFolderDataset

    path = write_random_dataset(str(tmp_path / "random.zip"), CONFIGS["tiny"], size=20, seed=3)
    dataset = ImageFolderDataset(path, use_labels=True)
    assert len(dataset) == 20 and dataset.image_shape == [3, 16, 16] and dataset.label_dim == 10
    images = np.stack([dataset[i][0] for i in range(20)])
    labels = np.stack([dataset[i][1] for i in range(20)])
    assert images.dtype == np.uint8 and 100 < images.mean() < 155 and images.std() > 60
    assert (labels.sum(axis=1) == 1).all() and len(set(labels.argmax(axis=1))) > 3
    assert os.listdir(tmp_path) == ["random.zip"]


def test_train_cli_fast_path_options_reach_the_loop(fashion_mnist_8_zip, tmp_path):
    """--channels-last/--compile/--retain-memory/... go to training_loop(fast_paths=...); a channels_last bf16 run
    trains, logs its fast paths with its precision and writes contiguous snapshots."""
    from click.testing import CliRunner

    import train
    from training.checkpoint import load_network_pkl

    common = [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--cond=1", "--cbase=8", "--cres=1,2",
              "--batch=8", "--seed=1", "--grid=0", "--workers=0", "--nosubdir"]
    dry = CliRunner().invoke(train.main, [*common, "--channels-last=1", "--compile=0", "--tf32=1", "--retain-memory=0",
                                          "--dry-run"])
    assert dry.exit_code == 0, dry.output
    config = json.loads(dry.output[dry.output.index("{"):dry.output.rindex("}") + 1])
    assert config["fast_paths"] == dict(channels_last=True, compile=False, tf32=True, retain_memory=False)
    run = CliRunner().invoke(train.main, [*common, "--channels-last=1", "--bf16=1", "--duration=0.000016",
                                          "--tick=0.008"])
    assert run.exit_code == 0, run.output
    log = (tmp_path / "log.txt").read_text()
    assert "Fast paths: sdpa+channels_last+fused_adam+retain_memory+bf16\n" in log
    ema = load_network_pkl(str(tmp_path / "network-snapshot-000000.016.pkl"))["ema"]
    assert all(p.is_contiguous() for p in ema.parameters())


def test_generate_cli_fast_paths_give_the_same_images(tmp_path):
    from click.testing import CliRunner

    from conftest import make_tiny_net
    from generate import main
    from training.checkpoint import save_network_pkl
    from training.sampling import PaperSampler, generate_images

    pkl = str(tmp_path / "net.pkl")
    save_network_pkl(pkl, dict(ema=make_tiny_net(label_dim=4), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    expected = generate_images(make_tiny_net(label_dim=4), [0, 1], sampler=PaperSampler(num_steps=3)).to(torch.int16)
    for options, max_levels in (["--channels-last=1"], 1), (["--precision=bf16"], 12):
        grid = tmp_path / f"grid{len(options[0])}.png"
        result = CliRunner().invoke(main, ["--network", pkl, "--seeds=0,1", "--steps=3", "--grid", str(grid),
                                           *options])
        assert result.exit_code == 0, result.output
        images = torch.from_numpy(np.array(PIL.Image.open(grid))).permute(2, 0, 1).to(torch.int16)
        difference = (images[:, :8, :16] - torch.cat(list(expected), dim=2)).abs()
        assert difference.max() <= max_levels, options  # uint8 levels (float rounding / bf16's 8-bit mantissa)


def test_sampling_on_the_cpu_takes_the_networks_memory_format_default():
    """prepare_for_sampling takes the CPU's defaults for the network it is given: EDM2's U-Net NHWC, DDPM++ NCHW;
    an explicit --channels-last wins."""
    from conftest import make_tiny_net
    from training.sampling.generation import GenerateOptions, prepare_for_sampling
    from training.networks.edm2 import Precond as EDM2Precond

    def conv_weight_is_nhwc(net):
        weight = next(p for p in net.parameters() if p.ndim == 4 and p.shape[-1] > 1)
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    def edm2():
        return EDM2Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1, 1],
                           num_blocks=1, attn_resolutions=[])

    cpu = torch.device("cpu")
    for net, fast_paths, nhwc in ((make_tiny_net(), {}, False), (edm2(), {}, True),
                                  (edm2(), dict(channels_last=False), False),
                                  (make_tiny_net(), dict(channels_last=True), True)):
        options = GenerateOptions(network="unused", seeds=[0], fast_paths=fast_paths)
        assert conv_weight_is_nhwc(prepare_for_sampling(net, options, cpu)) == nhwc, (type(net), fast_paths)
