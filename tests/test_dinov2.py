"""metrics/dinov2.py and FD-DINOv2 through fid.py: the preprocessing, the position embedding and the class token
against computations written out here from their definitions, on a small random-weight ViT of timm's DINOv2 class
loaded from a checkpoint in the official release's layout; reference files (ours and EDM2's); bad input."""

from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import metrics.dinov2
from metrics.dinov2 import build_vit, from_official, interpolated_pos_embed, load_dinov2_detector, preprocess
from metrics.frechet import feature_statistics, frechet_distance

# timm's DINOv2 ViT-L/14 entry point with a smaller width and depth: the same class and loading path, in milliseconds.
TINY_ARCHITECTURE = dict(model_name="vit_large_patch14_dinov2", embed_dim=64, depth=2, num_heads=4)
OFFICIAL_GRID = 37  # DINOv2 trained at 518x518: a 37x37 grid of 14-pixel patches.
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def official_checkpoint(embed_dim: int = 64, depth: int = 2, seed: int = 0, device: str = "cpu"
                        ) -> dict[str, torch.Tensor]:
    """Random weights under the names and shapes of DINOv2's release checkpoints (``dinov2_vitl14_pretrain.pth``
    with embed_dim 1024, depth 24): a ViT/14 with a class token, a 37x37 position grid, LayerScale, a 4x MLP, and
    the mask token of its masked training. Scaled so that every part moves the output."""
    g = torch.Generator().manual_seed(seed)
    d = embed_dim

    def randn(*shape, scale=1.0, offset=0.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * scale + offset

    sd = {"cls_token": randn(1, 1, d), "pos_embed": randn(1, 1 + OFFICIAL_GRID ** 2, d, scale=0.5),
          "mask_token": randn(1, d), "patch_embed.proj.weight": randn(d, 3, 14, 14, scale=1 / 14),
          "patch_embed.proj.bias": randn(d, scale=0.1), "norm.weight": randn(d, scale=0.1, offset=1),
          "norm.bias": randn(d, scale=0.1)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": randn(d, scale=0.1, offset=1), b + "norm1.bias": randn(d, scale=0.1),
            b + "attn.qkv.weight": randn(3 * d, d, scale=d ** -0.5), b + "attn.qkv.bias": randn(3 * d, scale=0.1),
            b + "attn.proj.weight": randn(d, d, scale=d ** -0.5), b + "attn.proj.bias": randn(d, scale=0.1),
            b + "ls1.gamma": randn(d, scale=0.2, offset=0.5),
            b + "norm2.weight": randn(d, scale=0.1, offset=1), b + "norm2.bias": randn(d, scale=0.1),
            b + "mlp.fc1.weight": randn(4 * d, d, scale=d ** -0.5), b + "mlp.fc1.bias": randn(4 * d, scale=0.1),
            b + "mlp.fc2.weight": randn(d, 4 * d, scale=(4 * d) ** -0.5), b + "mlp.fc2.bias": randn(d, scale=0.1),
            b + "ls2.gamma": randn(d, scale=0.2, offset=0.5)})
    return sd


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth")
    torch.save(official_checkpoint(), path)
    return path


@pytest.fixture
def tiny_dinov2(monkeypatch, dinov2_checkpoint) -> str:
    """fid.py and the training loop build the tiny architecture instead of ViT-L/14, and reference files hold its
    64 features instead of 1024; returns the checkpoint."""
    import dataclasses

    import metrics.reference
    monkeypatch.setattr(metrics.dinov2, "ARCHITECTURE", TINY_ARCHITECTURE)
    layout = dataclasses.replace(metrics.reference.LAYOUTS["dinov2"], feature_dim=TINY_ARCHITECTURE["embed_dim"])
    monkeypatch.setitem(metrics.reference.LAYOUTS, "dinov2", layout)
    return dinov2_checkpoint


# ----------------------------------------------------------------------------
# Independent computations, from the definitions.

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: PIL's bicubic resampling (a = -0.5), which torch's ``antialias=True`` follows. Output pixel i
    is centred at (i + 0.5) n_in / n_out; shrinking stretches the kernel by n_in / n_out (the antialiasing); taps
    outside the image are dropped and the weights renormalised."""
    scale = n_in / n_out
    taps = np.arange(n_in) + 0.5
    weights = np.stack([_cubic((taps - (i + 0.5) * scale) / max(scale, 1.0), a=-0.5) for i in range(n_out)])
    return weights / weights.sum(axis=1, keepdims=True)


def reference_preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] -> float64 [N, 3, 224, 224]: grayscale repeated, resized, / 255, ImageNet-normalised."""
    x = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
    rows, cols = antialiased_bicubic_matrix(x.shape[2], 224), antialiased_bicubic_matrix(x.shape[3], 224)
    resized = rows @ x.astype(np.float64) @ cols.T
    return (resized / 255 - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]


def dinov2_pos_embed_matrix(m: int, grid: int) -> np.ndarray:
    """[grid, m]: DINOv2's run-time resizing of its m x m position grid, along one axis. Output i samples the source
    at s = (i + 0.5) m / (grid + 0.1) - 0.5 (its interpolate_offset 0.1 in the scale factor) with Keys' cubic,
    a = -0.75, on the taps floor(s) - 1 .. floor(s) + 2 clamped to the border; no antialiasing."""
    weights = np.zeros([grid, m])
    for i in range(grid):
        s = (i + 0.5) * m / (grid + 0.1) - 0.5
        f = math.floor(s)
        for k in (-1, 0, 1, 2):
            weights[i, min(max(f + k, 0), m - 1)] += _cubic(np.array(s - f - k), a=-0.75)
    return weights


def reference_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    m, d = OFFICIAL_GRID, pos_embed.shape[-1]
    w = torch.from_numpy(dinov2_pos_embed_matrix(m, grid))
    patches = torch.einsum("ip,jq,pqd->ijd", w, w, pos_embed[0, 1:].double().reshape(m, m, d)).reshape(1, -1, d)
    return torch.cat([pos_embed[:, :1].double(), patches], dim=1)


def reference_class_token(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """DINOv2's ViT written out in float64: patches + class token + position embedding resized at run time, blocks
    x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) (layer norms with eps 1e-6, exact GELU), the final norm; the
    class token [N, D]."""
    p = {k: v.double() for k, v in sd.items()}
    n, d = x.shape[0], p["cls_token"].shape[-1]
    head_dim = d // num_heads
    patches = F.conv2d(x.double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=14)
    tokens = torch.cat([p["cls_token"].expand(n, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + reference_pos_embed(p["pos_embed"], patches.shape[-1])

    def norm(t, name):
        return F.layer_norm(t, (d,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)

    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = norm(tokens, b + "norm1") @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
        q, k, v = qkv.reshape(n, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(n, -1, d)
        tokens = tokens + p[b + "ls1.gamma"] * (mixed @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"])
        hidden = F.gelu(norm(tokens, b + "norm2") @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"])
        tokens = tokens + p[b + "ls2.gamma"] * (hidden @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"])
    return norm(tokens, "norm")[:, 0]


def reference_features(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The features of ``official_checkpoint(seed=seed)`` for uint8 images, computed independently."""
    x = torch.from_numpy(reference_preprocess(images))
    return reference_class_token(official_checkpoint(seed=seed), x, TINY_ARCHITECTURE["num_heads"]).numpy()


def sample_images(num: int, channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 images: smooth ramps plus noise, so that both the resize and the network see structure."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 160, height), np.linspace(0, 80, width))
    images = ramp[None, None] + rng.uniform(0, 95, [num, channels, height, width])
    return images.round().astype(np.uint8)


# ----------------------------------------------------------------------------
# The detector.

@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 28, 28), (1, 3, 300, 260)],
                         ids=["upsampled", "grayscale", "downsampled"])
def test_preprocessing_is_antialiased_bicubic_to_224_then_imagenet_normalized(shape):
    images = sample_images(*shape)
    ours = preprocess(torch.from_numpy(images))
    assert ours.shape == (shape[0], 3, 224, 224) and ours.dtype == torch.float32
    # One gray level is 1 / 255 / 0.229 = 0.017 here; float32 rounding stays below 1e-4.
    np.testing.assert_allclose(ours.double().numpy(), reference_preprocess(images), rtol=0, atol=1e-4)


def test_preprocessing_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 1 or 3, H, W\], got \[2, 4, 8, 8\]"):
        preprocess(torch.zeros([2, 4, 8, 8], dtype=torch.uint8))


def test_position_embedding_is_dinov2s_run_time_interpolation():
    pos_embed = official_checkpoint()["pos_embed"]
    ours = interpolated_pos_embed(pos_embed, 16)
    expected = reference_pos_embed(pos_embed, 16)
    assert ours.shape == (1, 257, 64) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), expected.numpy(), rtol=0, atol=1e-5)
    by_size = F.interpolate(pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2), size=(16, 16),
                            mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 64)
    assert (by_size - ours[:, 1:]).abs().max() > 0.01  # The offset moves the samples: a size alone differs.
    square = torch.randn([1, 1 + 16 * 16, 8])
    assert torch.equal(interpolated_pos_embed(square, 16), square)


def test_features_are_the_class_token_of_dinov2s_vit(dinov2_checkpoint):
    """Preprocessing, the release checkpoint's weights in timm's ViT, the position embedding and the class token
    after the final norm, against ``reference_class_token`` on ``reference_preprocess``'s images."""
    detector = load_dinov2_detector(dinov2_checkpoint, architecture=TINY_ARCHITECTURE)
    assert detector.feature_dim == 64
    for shape in [(3, 3, 40, 48), (2, 1, 32, 32)]:
        images = sample_images(*shape, seed=shape[1])
        features = detector(torch.from_numpy(images))
        assert features.shape == (shape[0], 64) and features.dtype == torch.float32
        expected = reference_features(images)
        assert np.abs(expected).max() > 0.5
        np.testing.assert_allclose(features.double().numpy(), expected, rtol=0, atol=2e-4)


def test_the_official_vit_l14_checkpoint_layout_fits_timms_vit_l14():
    """Names and shapes of dinov2_vitl14_pretrain.pth (width 1024, 24 blocks, 37x37 positions, no weights
    allocated) convert to timm's ViT-L/14 at 224x224: 16x16 positions, 1024 features."""
    vit = build_vit()
    official = official_checkpoint(1024, 24, device="meta")
    converted = from_official(official, vit, "official layout")
    assert converted["pos_embed"].shape == (1, 257, 1024) and "mask_token" not in converted
    assert vit.num_features == 1024 and len(converted) == len(official) - 1 == 4 + 24 * 14 + 2


# ----------------------------------------------------------------------------
# FD-DINOv2 through fid.py.

from test_fid import _fid_cli, _write_pngs  # noqa: E402 (fid.py's runner and image folders, shared)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fd-dinov2-images")
    a, b = sample_images(6, 3, 32, 32, seed=1), sample_images(6, 3, 32, 32, seed=2)[..., ::-1].copy()
    return dict(a=_write_pngs(root / "a", a), b=_write_pngs(root / "b", b), images=dict(a=a, b=b))


def _fd_line(output: str) -> float:
    return float([line for line in output.splitlines() if line.startswith("FD_DINOV2: ")][0].split()[1])


@pytest.fixture
def cheap_fid(monkeypatch):
    """The FID's 2048-D Fréchet distance replaced by |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2), a function of the same
    statistics without the seconds of 2048x2048 eigendecompositions (the general one: test_frechet.py); other
    dimensions (FD-DINOv2's) keep the real one."""
    import metrics.evaluate

    def frechet(mu1, sigma1, mu2, sigma2):
        if len(mu1) != 2048:
            return frechet_distance(mu1, sigma1, mu2, sigma2)
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))
    monkeypatch.setattr(metrics.evaluate, "frechet_distance", frechet)


def test_fd_dinov2_is_the_frechet_distance_of_the_class_tokens_and_fid_is_unchanged(folders, tiny_dinov2, tmp_path,
                                                                                   fid_cache_dir, cheap_fid):
    """`fid.py ref --metrics=fid,fd_dinov2` writes both statistics (the FID's as FID alone writes them); `calc`
    prints FD_DINOV2 = the Fréchet distance of the independently computed features, and the same FID as alone."""
    both, alone = tmp_path / "both.npz", tmp_path / "alone.npz"
    common = ["--batch=4", "--workers=0", f"--dinov2={tiny_dinov2}"]
    result = _fid_cli("ref", f"--data={folders['a']}", f"--dest={both}", "--metrics=fid,fd_dinov2", *common)
    assert result.exit_code == 0, result.output
    assert _fid_cli("ref", f"--data={folders['a']}", f"--dest={alone}", *common).exit_code == 0
    with np.load(both) as ref, np.load(alone) as fid_ref:
        assert sorted(ref.files) == ["fd_dinov2_mu", "fd_dinov2_sigma", "mu", "sigma"]
        assert sorted(fid_ref.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(ref["sigma"], fid_ref["sigma"])
        mu, sigma = feature_statistics(reference_features(folders["images"]["a"]))
        np.testing.assert_allclose(ref["fd_dinov2_mu"], mu, rtol=0, atol=2e-4)
        np.testing.assert_allclose(ref["fd_dinov2_sigma"], sigma, rtol=0, atol=2e-4)

    calc = ["calc", f"--images={folders['b']}", f"--ref={both}", "--num=6", *common]
    result = _fid_cli(*calc, "--metrics=fid,fd_dinov2")
    assert result.exit_code == 0, result.output
    expected = frechet_distance(*feature_statistics(reference_features(folders["images"]["b"])), mu, sigma)
    assert expected > 0.1 and _fd_line(result.output) == pytest.approx(expected, rel=1e-4)
    fid_alone = _fid_cli(*calc)
    assert fid_alone.exit_code == 0, fid_alone.output
    assert result.output.strip().splitlines()[-1] == fid_alone.output.strip().splitlines()[-1]


def test_network_samples_are_made_once_for_both_detectors(tiny_dinov2, tmp_path, fid_cache_dir, cheap_fid,
                                                          monkeypatch):
    """calc --network --metrics=fd_dinov2,fid samples each seed once; its FD-DINOv2 is that of the PNGs
    generate.py writes."""
    import training.sampling.generation as generation
    from conftest import make_tiny_net
    from generate import main as generate_main
    from metrics.evaluate import reference_from_features
    from metrics.reference import save_reference
    from training.checkpoint import save_network_pkl

    pkl = str(tmp_path / "net.pkl")
    save_network_pkl(pkl, dict(ema=make_tiny_net(label_dim=0), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    out = tmp_path / "out"
    result = CliRunner().invoke(generate_main, [f"--network={pkl}", f"--outdir={out}", "--seeds=0-3", "--steps=3",
                                                "--device=cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pngs = np.stack([np.array(PIL.Image.open(out / f"{seed:06d}.png")).transpose(2, 0, 1) for seed in range(4)])
    ref = str(tmp_path / "ref.npz")
    reference = sample_images(5, 3, 8, 8, seed=3)
    save_reference(ref, dict(**reference_from_features(np.zeros([3, 2048]) + np.arange(3)[:, None]),
                             **reference_from_features(reference_features(reference), detector="dinov2")))
    sampled = []
    real_generate = generation.generate_images
    monkeypatch.setattr(generation, "generate_images", lambda net, seeds, **kw: sampled.append(list(seeds))
                        or real_generate(net, seeds, **kw))
    result = _fid_cli("calc", f"--network={pkl}", "--seeds=0-3", f"--ref={ref}", "--metrics=fd_dinov2,fid",
                      "--batch=2", "--steps=3", f"--dinov2={tiny_dinov2}")
    assert result.exit_code == 0, result.output
    assert sorted(sum(sampled, [])) == [0, 1, 2, 3]
    expected = frechet_distance(*feature_statistics(reference_features(pngs)),
                                *feature_statistics(reference_features(reference)))
    assert _fd_line(result.output) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------
# Reference files.

def _statistics(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a symmetric matrix of the size of a detector's statistics (the files do not check more)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal([dim, dim])
    return rng.standard_normal(dim), (a + a.T) / 2


def test_reference_files_round_trip_ours_and_edm2s(tmp_path):
    from metrics.reference import load_reference, save_reference
    mu, sigma = _statistics(2048, 0)
    dino_mu, dino_sigma = _statistics(1024, 1)
    ref = dict(mu=mu, sigma=sigma, fd_dinov2_mu=dino_mu, fd_dinov2_sigma=dino_sigma)
    for name in ("ours.npz", "edm2.pkl"):  # The second in EDM2's layout and its default pickle protocol, 4.
        save_reference(str(tmp_path / name), ref)
        loaded = load_reference(str(tmp_path / name))
        assert sorted(loaded) == sorted(ref) and all(np.array_equal(loaded[k], ref[k]) for k in ref)
    with np.load(tmp_path / "ours.npz") as official_reader:  # EDM's fid.py reads 'mu' and 'sigma' only.
        assert np.array_equal(official_reader["mu"], mu) and np.array_equal(official_reader["sigma"], sigma)
    with open(tmp_path / "edm2.pkl", "rb") as f:  # EDM2's calculate_metrics.py reads stats[metric]['mu'].
        assert sorted(pickle.load(f)) == ["fd_dinov2", "fid"]

    for protocol in (2, 5):  # As EDM2's calculate_metrics.py writes them (its default: 4): arrays from torch.
        official = dict(num_images=50000,
                        fid=dict(mu=torch.from_numpy(mu).numpy(), sigma=torch.from_numpy(sigma).numpy()),
                        fd_dinov2=dict(mu=dino_mu, sigma=dino_sigma))
        path = tmp_path / f"img512-{protocol}.pkl"
        path.write_bytes(pickle.dumps(official, protocol=protocol))
        loaded = load_reference(str(path))
        assert sorted(loaded) == sorted(ref) and all(np.array_equal(loaded[k], ref[k]) for k in ref)


def test_a_reference_of_fd_dinov2_alone_serves_fd_dinov2_only(tmp_path):
    from metrics.evaluate import compute_metrics, reference_from_features
    from metrics.reference import load_reference, save_reference
    features = np.random.default_rng(0).standard_normal([6, 1024])
    path = str(tmp_path / "dino.npz")
    save_reference(path, reference_from_features(features, detector="dinov2"))
    ref = load_reference(path)
    assert sorted(ref) == ["fd_dinov2_mu", "fd_dinov2_sigma"]
    assert compute_metrics({"dinov2": features}, ref, ["fd_dinov2"])["fd_dinov2"] == pytest.approx(0, abs=1e-2)
    with pytest.raises(ValueError, match=r"FID needs the reference's inception statistics \('mu', 'sigma'\)"):
        compute_metrics({"inception": np.zeros([6, 2048])}, ref, ["fid"])


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


def test_a_pickle_that_names_other_globals_is_refused_and_nothing_runs(tmp_path):
    from metrics.reference import ReferenceFileError, load_reference
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(dict(fid=dict(mu=_RunsCode(marker)))))
    with pytest.raises(ReferenceFileError, match="refusing to load: the pickle references 'builtins.exec'"):
        load_reference(str(path))
    assert not marker.exists()


def test_reference_shapes_are_checked_per_detector(tmp_path):
    from metrics.reference import ReferenceFileError, save_reference
    mu, sigma = _statistics(2048, 0)
    with pytest.raises(ReferenceFileError, match=r"'fd_dinov2_mu' has shape \[2048\], expected \[1024\] \(class"):
        save_reference(str(tmp_path / "bad.npz"), dict(mu=mu, sigma=sigma, fd_dinov2_mu=mu, fd_dinov2_sigma=sigma))
    with pytest.raises(ReferenceFileError, match="lacks 'fd_dinov2_sigma'"):
        save_reference(str(tmp_path / "bad.npz"), dict(mu=mu, sigma=sigma, fd_dinov2_mu=mu[:1024]))


def test_cached_dataset_statistics_are_keyed_by_detector_and_computed_in_one_pass(tmp_path, fid_cache_dir):
    """Each detector's statistics are cached apart (the Inception's where FID alone caches them); the missing
    ones come from one pass; other DINOv2 weights are other statistics."""
    from metrics.evaluate import cached_dataset_reference, cached_dataset_references, detector_settings

    class Fake:
        def __init__(self, name, dim, weights):
            self.name, self.feature_dim, self.weights_sha256, self.preprocess_mode = name, dim, weights, "fake"

    data = _write_pngs(tmp_path / "data", sample_images(3, 3, 8, 8))
    inception, dino, other_dino = Fake("inception", 2048, "i"), Fake("dinov2", 1024, "d"), Fake("dinov2", 1024, "e")
    passes = []

    def features(missing):
        passes.append(sorted(missing))
        return {name: np.random.default_rng(len(passes)).standard_normal([3, d.feature_dim])
                for name, d in missing.items()}

    first = cached_dataset_references(data, {"inception": inception, "dinov2": dino}, features)
    assert passes == [["dinov2", "inception"]] and sorted(first) == ["fd_dinov2_mu", "fd_dinov2_sigma", "mu", "sigma"]
    again = cached_dataset_references(data, {"inception": inception, "dinov2": dino}, features)
    assert len(passes) == 1 and all(np.array_equal(first[k], again[k]) for k in first)
    alone = cached_dataset_reference(data, lambda: pytest.fail("recomputed"), detector_settings(inception))
    assert np.array_equal(alone["sigma"], first["sigma"])
    cached_dataset_references(data, {"inception": inception, "dinov2": other_dino}, features)
    assert passes[1:] == [["dinov2"]]


# ----------------------------------------------------------------------------
# Bad input: one line.

def _assert_clear_error(result, message: str):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert message in result.output, result.output


def test_without_timm_fd_dinov2_says_how_to_install_it(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed.
    _assert_clear_error(_fid_cli("ref", f"--data={folders['a']}", f"--dest={tmp_path / 'ref.npz'}",
                                 "--metrics=fd_dinov2", "--workers=0"),
                        "Error: fd_dinov2 needs the timm package: pip install -r requirements-extras.txt")
    assert not (tmp_path / "ref.npz").exists()


def test_bad_dinov2_checkpoints_get_one_line(folders, tiny_dinov2, tmp_path):
    ref = ["ref", f"--data={folders['a']}", f"--dest={tmp_path / 'ref.npz'}", "--metrics=fd_dinov2", "--workers=0"]
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    _assert_clear_error(_fid_cli(*ref, f"--dinov2={tmp_path / 'garbage.pth'}"), "not a PyTorch weights file")
    _assert_clear_error(_fid_cli(*ref, f"--dinov2={tmp_path / 'missing.pth'}"), "missing.pth: no such file")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    _assert_clear_error(_fid_cli(*ref, f"--dinov2={tmp_path / 'other.pth'}"),
                        "lacks 'cls_token'; not a DINOv2 checkpoint of a ViT/14 of width 64 and depth 2")
    torch.save(official_checkpoint(embed_dim=32), tmp_path / "narrow.pth")
    _assert_clear_error(_fid_cli(*ref, f"--dinov2={tmp_path / 'narrow.pth'}"),
                        "'pos_embed' has shape [1, 1370, 32], expected [1, 1 + M^2, 64]")
    torch.save(official_checkpoint(depth=3), tmp_path / "deep.pth")
    _assert_clear_error(_fid_cli(*ref, f"--dinov2={tmp_path / 'deep.pth'}"), "has unexpected 'blocks.2.attn.proj.bias'")
    assert not (tmp_path / "ref.npz").exists()


def test_a_reference_without_fd_dinov2_statistics_is_refused_before_any_work(folders, tmp_path):
    ref = tmp_path / "fid-only.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    _assert_clear_error(_fid_cli("calc", f"--images={folders['b']}", f"--ref={ref}", "--num=6",
                                 "--metrics=fid,fd_dinov2", "--dinov2=/nonexistent.pth"),
                        "FD_DINOV2 needs the reference's dinov2 statistics ('fd_dinov2_mu', 'fd_dinov2_sigma')")
