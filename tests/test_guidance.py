"""Guidance (training/sampling/guidance.py GuidedDenoiser): the official EDM2 guided sampler's images, the formula, w = 1 as
the unguided sampler, the noise-level interval, and classifier-free guidance on an analytic Gaussian model."""

import os

from click.testing import CliRunner

import pytest
import torch

from conftest import FIXTURES, make_tiny_net
from training.networks.edm2 import Precond as EDM2Precond
from training.sampling import (UNCONDITIONAL, GuidedDenoiser, PaperSampler, SeedRNG, draw_class_labels, draw_latents,
                               edm_sampler, generate_images, guided, sampler_spec)

pytestmark = pytest.mark.usefixtures("single_thread")


class Counting:
    """A network that counts its calls and records the noise levels it saw."""

    def __init__(self, net):
        self.net, self.calls, self.sigmas = net, 0, []

    def __getattr__(self, name):
        return getattr(self.__dict__["net"], name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.calls += 1
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.net(x, sigma, class_labels, **kwargs)


def test_official_edm2_guided_sampler_images():
    """The golden images: a 16x16 EDM2 network guided by a smaller one, w = 2, 6 Heun steps, seeds 0 and 1, noise
    and classes drawn per seed. The official sampler runs in float32 and ours in float64: 3e-5 apart on values up
    to 11."""
    golden = torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)
    g = golden["guided"]
    net = EDM2Precond(**golden["init_kwargs"]).eval()
    net.load_state_dict(golden["state_dict"])
    gnet = EDM2Precond(**g["gnet_init_kwargs"]).eval()
    gnet.load_state_dict(g["gnet_state_dict"])
    rng = SeedRNG(g["seeds"])
    latents, labels = draw_latents(net, rng), draw_class_labels(net, rng)
    with torch.no_grad():
        images = edm_sampler(guided(net, gnet, g["guidance"]), latents, labels, randn_like=rng.randn_like,
                             num_steps=g["num_steps"])
        unguided = edm_sampler(net, latents, labels, randn_like=SeedRNG(g["seeds"]).randn_like,
                               num_steps=g["num_steps"])
    torch.testing.assert_close(images.float(), g["images"], rtol=0, atol=1e-4)
    assert (unguided.float() - g["images"]).abs().max() > 0.1  # Guidance did change the images.


def test_guided_denoiser_is_the_formula():
    torch.manual_seed(0)
    net, guide = make_tiny_net(label_dim=4).eval(), make_tiny_net(label_dim=4, seed=1).eval()
    x, labels = torch.randn(3, 3, 16, 16), torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        for sigma in (0.05, 1.0, 20.0):
            for w in (0.5, 2.0, 3.7):
                D, D_g = net(x, sigma, labels), guide(x, sigma, labels)
                torch.testing.assert_close(GuidedDenoiser(net, guide, w)(x, sigma, labels), D_g + w * (D - D_g),
                                           rtol=1e-5, atol=1e-5)


def test_an_unconditional_guide_is_called_without_labels():
    """EDM2's classifier-free guidance presets guide a conditional network by a separate unconditional one."""
    class RecordingLabels:
        label_dim = 0

        def __init__(self, net):
            self.net, self.seen = net, []

        def __call__(self, x, sigma, class_labels=None):
            self.seen.append(class_labels)
            return self.net(x, sigma, class_labels)

    net, guide = make_tiny_net(label_dim=4).eval(), RecordingLabels(make_tiny_net(label_dim=0, seed=1).eval())
    x, labels = torch.randn(3, 3, 16, 16), torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        D, D_g = net(x, 1.0, labels), guide.net(x, 1.0)
        torch.testing.assert_close(GuidedDenoiser(net, guide, 1.4)(x, 1.0, labels), D_g + 1.4 * (D - D_g),
                                   rtol=1e-5, atol=1e-5)
    assert guide.seen == [None]


def test_weight_one_is_the_unguided_sampler_bit_for_bit_and_never_calls_the_guide():
    net, guide = make_tiny_net(label_dim=4).eval(), Counting(make_tiny_net(label_dim=4, seed=1).eval())
    kwargs = dict(num_steps=4, S_churn=10, S_min=0.01, S_max=20)
    plain = generate_images(net, [3, 8], sampler=sampler_spec(**kwargs))
    assert torch.equal(generate_images(GuidedDenoiser(net, guide, 1.0), [3, 8], sampler=sampler_spec(**kwargs)), plain)
    assert guided(net, guide, 1.0) is net and guided(net, None, 2.0) is net
    assert guide.calls == 0
    guided_images = generate_images(GuidedDenoiser(net, guide, 2.0), [3, 8], sampler=sampler_spec(**kwargs))
    assert not torch.equal(guided_images, plain)
    assert guide.calls == 2 * 4 - 1  # Heun: two calls per step but the last.


def test_interval_calls_the_guide_only_inside_it():
    net, guide = make_tiny_net(label_dim=4).eval(), Counting(make_tiny_net(label_dim=4, seed=1).eval())
    lo, hi = 0.3, 5.0
    denoiser = GuidedDenoiser(net, guide, 2.5, interval=(lo, hi))
    generate_images(denoiser, [0, 1], sampler=PaperSampler(num_steps=8))
    assert guide.sigmas and all(lo <= s <= hi for s in guide.sigmas)
    all_sigmas = Counting(net)
    generate_images(all_sigmas, [0], sampler=PaperSampler(num_steps=8))
    assert len(guide.sigmas) == sum(lo <= s <= hi for s in all_sigmas.sigmas) < len(all_sigmas.sigmas)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(denoiser(x, 10.0), net(x, 10.0))  # Outside: D itself.


def test_classifier_free_guidance_batches_both_calls_and_equals_the_formula():
    net = Counting(make_tiny_net(label_dim=4).eval())
    x, labels = torch.randn(3, 3, 16, 16), torch.eye(4)[[1, 1, 2]]
    with torch.no_grad():
        D, D_u = net(x, 0.7, labels), net(x, 0.7, torch.zeros_like(labels))
        net.calls = 0
        got = GuidedDenoiser(net, UNCONDITIONAL, 3.0)(x, torch.tensor(0.7, dtype=torch.float64), labels)
    assert net.calls == 1
    torch.testing.assert_close(got, D_u + 3.0 * (D - D_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedDenoiser(make_tiny_net(label_dim=0), UNCONDITIONAL, 2.0)


class GaussianClasses:
    """The exact denoiser of data x ~ N(mu_c, s^2 I) for class c, and of N(0, s_u^2 I) for the zero label (the
    'unconditional' model a label-dropout network learns, broader than any class): D = m + v / (v + sigma^2) (x - m)."""

    img_channels, img_resolution, label_dim = 1, 4, 2
    means = torch.tensor([2.0, -2.0])

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        labels = class_labels.to(x.dtype).reshape(-1, 2) if class_labels is not None else torch.zeros(1, 2)
        conditional = labels.sum(dim=1).reshape(-1, 1, 1, 1) > 0
        mean = (labels @ self.means.to(x.dtype)).reshape(-1, 1, 1, 1)
        var = torch.where(conditional, torch.tensor(0.25, dtype=x.dtype), torch.tensor(4.0, dtype=x.dtype))
        return mean + var / (var + sigma ** 2) * (x - mean)


def test_classifier_free_guidance_pulls_samples_toward_the_class_mean():
    model = GaussianClasses()
    rng = SeedRNG(range(64))
    latents = draw_latents(model, rng)
    labels = torch.eye(2)[[0] * 64]  # Class 0, mean 2.
    spread = {}
    for w in (1.0, 2.0, 4.0):
        x = edm_sampler(guided(model, UNCONDITIONAL, w), latents, labels, num_steps=32)
        spread[w] = (x - 2.0).pow(2).mean().sqrt().item()
    assert spread[1.0] == pytest.approx(0.5, rel=0.15)  # w = 1 samples the class itself: std s = 0.5.
    assert spread[4.0] < spread[2.0] < spread[1.0]


# ----------------------------------------------------------------------------
# The command lines: generate.py --gnet/--guidance/--guidance-interval and fid.py calc's guidance sweep.

@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    from training.checkpoint import save_network_pkl
    root = tmp_path_factory.mktemp("guided")
    paths = {}
    for name, net in (("net", make_tiny_net(label_dim=4)), ("gnet", make_tiny_net(label_dim=4, seed=1)),
                      ("unconditional", make_tiny_net(label_dim=0)),
                      ("small", make_tiny_net(label_dim=4, resolution=4))):
        paths[name] = str(root / f"{name}.pkl")
        save_network_pkl(paths[name], dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return paths


def run_generate(*args):
    from generate import main
    return CliRunner().invoke(main, [str(a) for a in args])


def read_png(path) -> torch.Tensor:
    import numpy as np
    import PIL.Image
    return torch.from_numpy(np.array(PIL.Image.open(path))).permute(2, 0, 1)


@pytest.mark.parametrize("gnet, extra", [("gnet", []), ("uncond", []), ("gnet", ["--guidance-interval=0.5,5"]),
                                         ("unconditional", [])])
def test_generate_cli_writes_the_guided_images(snapshots, tmp_path, gnet, extra):
    guide = UNCONDITIONAL if gnet == "uncond" else make_tiny_net(label_dim=0) if gnet == "unconditional" else \
        make_tiny_net(label_dim=4, seed=1)
    interval = (0.5, 5.0) if extra else None
    result = run_generate(f"--network={snapshots['net']}", f"--gnet={snapshots.get(gnet, gnet)}", "--guidance=2.5",
                          f"--outdir={tmp_path}", "--seeds=3-5", "--steps=5", "--device=cpu", *extra)
    assert result.exit_code == 0, result.output
    expected = generate_images(guided(make_tiny_net(label_dim=4), guide, 2.5, interval), [3, 4, 5],
                               sampler=PaperSampler(num_steps=5))
    for seed, image in zip([3, 4, 5], expected):
        assert torch.equal(read_png(tmp_path / f"{seed:06d}.png"), image)


@pytest.mark.parametrize("args, message", [
    (["--guidance=2"], "--guidance=2 needs a guiding network"),
    (["--gnet=uncond", "--guidance=2", "NET=unconditional"], "--gnet=uncond: "),
    (["--gnet=GNET=small", "--guidance=2"], "makes 3-channel 4x4 images, the network 3-channel 8x8"),
    (["--guidance-interval=5,1"], "expected 0 <= LO < HI"),
])
def test_generate_cli_guidance_errors_are_one_line(snapshots, tmp_path, args, message):
    network = snapshots["net"]
    resolved = []
    for arg in args:
        if arg.startswith("NET="):
            network = snapshots[arg[4:]]
        else:
            resolved.append(arg.replace("GNET=small", snapshots["small"]))
    result = run_generate(f"--network={network}", f"--outdir={tmp_path / 'out'}", "--seeds=0", "--steps=3", *resolved)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_fid_guidance_sweep_prints_each_weight_and_plots(snapshots, tmp_path, fid_detector, monkeypatch):
    """FID against a zero reference is |mu|^2 + Tr(sigma) of the samples' features (test_fid.py's closed form),
    computed here from generate_images on the guided denoiser. The CLI's Frechet distance is that closed form
    too (the general one costs 2048x2048 eigendecompositions, tested in test_frechet.py)."""
    import numpy as np
    import metrics.evaluate
    from fid import main as fid_main
    from metrics.frechet import feature_statistics
    from metrics.reference import save_reference

    def frechet_to_zero(mu1, sigma1, mu2, sigma2):
        assert not np.any(mu2) and not np.any(sigma2)
        return float(np.sum(mu1 ** 2) + np.trace(sigma1))
    monkeypatch.setattr(metrics.evaluate, "frechet_distance", frechet_to_zero)

    ref = str(tmp_path / "zero.npz")
    save_reference(ref, dict(mu=np.zeros(2048), sigma=np.zeros([2048, 2048])))
    plot = tmp_path / "sweep.png"
    result = CliRunner().invoke(fid_main, ["calc", f"--network={snapshots['net']}", f"--gnet={snapshots['gnet']}",
                                           "--guidance=1,2,...,3", "--seeds=0-3", f"--ref={ref}", "--steps=4",
                                           "--batch=4", f"--plot={plot}", "--device=cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = {float(line.split()[1].rstrip(":")): float(line.split()[-1]) for line in result.output.splitlines()
               if line.startswith("guidance ")}
    assert sorted(printed) == [1.0, 2.0, 3.0] and "<- best" in result.output
    net, gnet = make_tiny_net(label_dim=4), make_tiny_net(label_dim=4, seed=1)
    for w in (1.0, 3.0):
        with torch.no_grad():
            images = generate_images(guided(net, gnet, w), [0, 1, 2, 3], sampler=PaperSampler(num_steps=4))
            features = fid_detector(images).numpy()
        mu, sigma = feature_statistics(features)
        assert printed[w] == pytest.approx(np.sum(mu ** 2) + np.trace(sigma), rel=1e-5)
