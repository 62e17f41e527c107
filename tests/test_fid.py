"""fid.py and metrics/features.py: reference files in the official format, FID/KID of folders and of a
network's samples, torchrun sharding, bad input, and FID on real data (the embedded Fashion-MNIST)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import FASHION_MNIST_T10K, REPO_ROOT, fid_of_features, make_tiny_net
from metrics.frechet import feature_statistics, kernel_inception_distance


def _fid_cli(*args: str):
    from fid import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _write_pngs(folder, images: np.ndarray) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(folder, f"img{i:08d}.png"))
    return str(folder)


def _images(num: int, seed: int, smooth: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, [num, 3, 32, 32])
    if smooth:
        ramp = np.linspace(0, 255, 32)
        noise = 0.8 * (ramp[None, None, :, None] + ramp[None, None, None, :]) / 2 + 0.2 * noise
    return noise.round().astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fid_detector):
    """Two folders of 6 PNGs each, and the detector's features of their images (computed directly)."""
    root = tmp_path_factory.mktemp("fid-images")
    a, b = _images(6, seed=0, smooth=True), _images(6, seed=1, smooth=False)
    with torch.no_grad():
        features = {k: fid_detector(torch.from_numpy(v)).numpy() for k, v in (("a", a), ("b", b))}
    return dict(a=_write_pngs(root / "a", a), b=_write_pngs(root / "b", b), images=dict(a=a, b=b), features=features)


@pytest.fixture(scope="module")
def ref_npz(folders, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("refs") / "a.npz")
    result = _fid_cli("ref", f"--data={folders['a']}", f"--dest={dest}", "--batch=4", "--workers=0")
    assert result.exit_code == 0, result.output
    return dest


def test_ref_writes_official_format_statistics(folders, ref_npz):
    with np.load(ref_npz) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        mu, sigma = data["mu"], data["sigma"]
    assert mu.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    expected_mu, expected_sigma = feature_statistics(folders["features"]["a"])
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4, atol=1e-5)


def test_calc_prints_the_fid_alone_on_the_last_line(folders, tmp_path):
    """A reference with zero covariance has the closed form FID = |mu - mu_ref|^2 + Tr(sigma), and keeps
    scipy's 2048x2048 sqrtm cheap (for a general matrix it takes a minute on 2 cores). FID of general
    covariances: tests/test_frechet.py, and in full dimension tests/test_inception.py."""
    ref = tmp_path / "degenerate.npz"
    ref_mu = folders["features"]["a"].astype(np.float64).mean(0)
    np.savez(ref, mu=ref_mu, sigma=np.zeros([2048, 2048]))
    result = _fid_cli("calc", f"--images={folders['b']}", f"--ref={ref}", "--num=6", "--batch=6", "--workers=0")
    assert result.exit_code == 0, result.output
    fid = float(result.output.strip().splitlines()[-1])
    mu, sigma = feature_statistics(folders["features"]["b"])
    expected = np.sum((mu - ref_mu) ** 2) + np.trace(sigma)
    assert expected > 10
    assert fid == pytest.approx(expected, rel=1e-5)


def test_kid_against_a_dataset_reference_cached_by_content(folders, fid_detector, fid_cache_dir):
    """--ref=DATASET: statistics (and features, for KID) computed once, then read from the cache.
    --num below the number of images: the seeded subset of the dataset reader."""
    from metrics.evaluate import cached_dataset_reference, detector_settings
    from training.data.dataset import ImageFolderDataset
    result = _fid_cli("calc", f"--images={folders['b']}", f"--ref={folders['a']}", "--num=4", "--seed=3",
                      "--metrics=kid", "--batch=4", "--workers=0")
    assert result.exit_code == 0, result.output
    kid = float(result.output.strip().splitlines()[-1].split(":")[1])
    subset = ImageFolderDataset(folders["b"], max_size=4, random_seed=3)
    picked = [next(i for i, image in enumerate(folders["images"]["b"]) if np.array_equal(image, subset[j][0]))
              for j in range(len(subset))]
    assert len(set(picked)) == 4
    expected = kernel_inception_distance(folders["features"]["b"][picked], folders["features"]["a"])
    assert kid == pytest.approx(expected, rel=1e-3)
    cached = cached_dataset_reference(folders["a"], lambda: pytest.fail("statistics recomputed despite the cache"),
                                      detector_settings(fid_detector), keep_features=True)
    np.testing.assert_allclose(cached["features"], folders["features"]["a"], rtol=1e-4, atol=1e-5)


def test_ref_and_real_images_are_read_from_the_cache_the_second_time(folders, tmp_path, monkeypatch):
    """`fid.py ref` and `calc --images` keep what they computed, keyed by the images' content: a second run (the
    quickstart's reference and real-data floor) computes no features and gives the same numbers; --cache=0
    recomputes."""
    import fid
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    assert _fid_cli("ref", f"--data={folders['b']}", f"--dest={first}", "--batch=6", "--workers=0").exit_code == 0
    calc = ["calc", f"--images={folders['a']}", f"--ref={first}", "--num=5", "--seed=1", "--batch=6", "--workers=0"]
    result = _fid_cli(*calc)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(fid, "_dataset_features", lambda *args: pytest.fail("features recomputed despite the cache"))
    assert _fid_cli("ref", f"--data={folders['b']}", f"--dest={second}", "--batch=6", "--workers=0").exit_code == 0
    with np.load(first) as a, np.load(second) as b:
        np.testing.assert_array_equal(a["sigma"], b["sigma"])
        mu, _ = feature_statistics(folders["features"]["b"])
        np.testing.assert_allclose(b["mu"], mu, rtol=1e-4, atol=1e-5)
    again = _fid_cli(*calc)
    assert again.output.strip().splitlines()[-1] == result.output.strip().splitlines()[-1]
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # Another subset is not the cached one.
        _fid_cli(*calc[:-3], "--seed=2", *calc[-2:])
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        _fid_cli("ref", f"--data={folders['b']}", f"--dest={second}", "--cache=0", "--workers=0")


def test_two_processes_give_the_statistics_of_one(folders, ref_npz, fid_cache_dir, tmp_path):
    dest = tmp_path / "a-2proc.npz"
    env = dict(os.environ, EDM_CACHE_DIR=fid_cache_dir, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "fid.py"), "ref", f"--data={folders['a']}", f"--dest={dest}", "--batch=2",
               "--workers=0"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(ref_npz) as one, np.load(dest) as two:
        np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("classes", [[], ["--class=balanced"], ["--precision=bf16"]],
                         ids=["random", "balanced", "bf16"])
def test_in_memory_network_evaluation_equals_generate_then_calc(fid_detector, tmp_path, classes):
    """calc --network makes the images generate.py writes (same seeds, classes, sampler options, precision, uint8
    rounding), so its FID and KID equal those of the PNGs. The reference (zero mu and sigma, the PNGs' features) gives FID the
    closed form |mu|^2 + Tr(sigma) of the evaluated features."""
    from generate import main as generate_main
    from metrics.features import compute_features, dataset_batches
    from metrics.reference import save_reference
    from training.checkpoint import save_network_pkl
    from training.data.dataset import ImageFolderDataset

    pkl = str(tmp_path / "net.pkl")
    save_network_pkl(pkl, dict(ema=make_tiny_net(label_dim=4), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    sampler = ["--steps=4", "--S_churn=10", "--S_min=0.01", "--S_max=20", *classes]
    out = tmp_path / "out"
    result = CliRunner().invoke(generate_main, [f"--network={pkl}", f"--outdir={out}", "--seeds=0-3", "--batch=3",
                                                "--device=cpu", *sampler], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    on_disk = compute_features(fid_detector, dataset_batches(ImageFolderDataset(str(out)), 0), 4, batch_size=4)
    ref = str(tmp_path / "ref.npz")
    save_reference(ref, dict(mu=np.zeros(2048), sigma=np.zeros([2048, 2048]), features=on_disk))
    result = _fid_cli("calc", f"--network={pkl}", "--seeds=0-3", f"--ref={ref}", "--metrics=fid,kid", "--batch=4",
                      *sampler)
    assert result.exit_code == 0, result.output
    *_, kid_line, fid_line = result.output.strip().splitlines()
    mu, sigma = feature_statistics(on_disk)
    assert float(fid_line) == pytest.approx(np.sum(mu ** 2) + np.trace(sigma), rel=1e-5)
    assert float(kid_line.split(":")[1]) == pytest.approx(kernel_inception_distance(on_disk, on_disk), rel=1e-4)


def test_guidance_sweep_reports_the_best_weight_of_each_frechet_metric(tmp_path, capsys):
    """With FD-DINOv2 too, the table has a column per metric and each metric its own best weight and plot."""
    from fid import _report_guidance_sweep
    plot = tmp_path / "sweep.png"
    per_weight = {1.0: dict(fid=5.0, kid=0.1, fd_dinov2=300.0), 1.5: dict(fid=3.5, kid=0.2, fd_dinov2=250.0),
                  2.0: dict(fid=4.0, kid=0.3, fd_dinov2=200.0)}
    _report_guidance_sweep(per_weight, str(plot), 16)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["guidance", "FID", "FD_DINOV2"]
    assert lines[2].split() == ["1.5", "3.500", "250.000", "<-", "best", "FID"]
    assert lines[3].split() == ["2", "4.000", "200.000", "<-", "best", "FD_DINOV2"]
    assert lines[4:] == [f"Best guidance 1.5 (FID 3.500) of 3; plot in {plot}",
                         f"Best guidance 2 (FD_DINOV2 200.000) of 3; plot in {plot}"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# Bad input: one clear line, nothing written.

def _assert_clear_error(result, message: str):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert message in result.output, result.output


def test_fewer_images_than_num_is_an_error(folders, ref_npz):
    _assert_clear_error(_fid_cli("calc", f"--images={folders['b']}", f"--ref={ref_npz}", "--num=7"),
                        "found 6 images, but expected at least 7")


def test_bad_inputs_get_one_line_and_write_nothing(folders, tmp_path):
    dest = tmp_path / "ref.npz"
    _assert_clear_error(_fid_cli("ref", f"--data={tmp_path / 'missing'}", f"--dest={dest}"), "no such file or folder")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    _assert_clear_error(_fid_cli("ref", f"--data={tmp_path / 'texts'}", f"--dest={dest}"), "no image files found")
    broken = _write_pngs(tmp_path / "broken", folders["images"]["a"][:3])
    with open(os.path.join(broken, "img00000001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    _assert_clear_error(_fid_cli("ref", f"--data={broken}", f"--dest={dest}", "--workers=1"), "not a readable image")
    (tmp_path / "weights.pt").write_bytes(b"not weights")
    _assert_clear_error(_fid_cli("ref", f"--data={folders['a']}", f"--dest={dest}",
                                 f"--detector={tmp_path / 'weights.pt'}"), "not a PyTorch weights file")
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["broken", "texts", "weights.pt"]


def test_reference_of_the_wrong_shape_is_an_error(folders, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    _assert_clear_error(_fid_cli("calc", f"--images={folders['b']}", f"--ref={bad}", "--num=6"),
                        "'mu' has shape [64], expected [2048]")
    np.savez(bad, mean=np.zeros(2048))
    _assert_clear_error(_fid_cli("calc", f"--images={folders['b']}", f"--ref={bad}", "--num=6"), "lacks 'mu'")
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    _assert_clear_error(_fid_cli("calc", f"--images={folders['b']}", f"--ref={bad}", "--num=6", "--metrics=fid,kid"),
                        "KID needs the reference's features")


# ----------------------------------------------------------------------------
# Real data.

def _fashion_mnist(num: int) -> np.ndarray:
    """The first ``num`` images of the embedded Fashion-MNIST test split, padded to 32x32 as dataset_tool does."""
    with gzip.open(FASHION_MNIST_T10K) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:num]
    return np.pad(images[:, None], ((0, 0), (0, 0), (2, 2), (2, 2)))


def test_fid_on_fashion_mnist_is_small_for_halves_and_grows_with_damage(fid_detector):
    n = 20
    images = torch.from_numpy(_fashion_mnist(2 * n))
    half_a, half_b = images[:n], images[n:]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(half_b.shape, generator=generator)
    noised = [(half_b + s * noise).round().clamp(0, 255).to(torch.uint8) for s in (32, 96)]
    with torch.no_grad():
        features_a = fid_detector(half_a).numpy()
        fids = [fid_of_features(fid_detector(b).numpy(), features_a) for b in [half_b, *noised]]
    # With 20 images a side FID carries a large small-sample bias; the damage must still dominate it.
    assert fids[0] < 0.75 * fids[1] and fids[1] < fids[2]


def test_num_reaches_fid_py_under_torchrun_as_the_readme_writes_it(tmp_path):
    """torchrun's parser takes a bare --num for its own --numa-binding; with '--' before the script, as the README
    writes it, --num reaches fid.py, which parses it and goes on to report the missing reference file."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        assert "torchrun --standalone --nproc_per_node=8 -- fid.py calc" in f.read()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--",
               os.path.join(REPO_ROOT, "fid.py"), "calc", f"--images={tmp_path / 'missing'}", "--ref=ref.npz",
               "--num=10"]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ambiguous option" not in output and "No such option" not in output
    assert "Error: ref.npz: cannot read reference statistics" in output, output[-2000:]


def test_repeats_measure_disjoint_seed_sets_and_report_min_mean_and_spread(fid_detector, tmp_path, monkeypatch):
    """--repeats=3 with --seeds=0-3: seeds 0-3, 4-7 and 8-11, each FID that of generate_images' images for them (the
    closed form |mu|^2 + Tr(sigma) against a zero reference), then the minimum, mean and std; the minimum last."""
    import metrics.evaluate
    from metrics.reference import save_reference
    from training.checkpoint import save_network_pkl
    from training.sampling import PaperSampler, generate_images

    monkeypatch.setattr(metrics.evaluate, "frechet_distance",
                        lambda mu1, sigma1, mu2, sigma2: float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1)))
    net = make_tiny_net(label_dim=4)
    pkl, ref = str(tmp_path / "net.pkl"), str(tmp_path / "ref.npz")
    save_network_pkl(pkl, dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    save_reference(ref, dict(mu=np.zeros(2048), sigma=np.zeros([2048, 2048])))
    result = _fid_cli("calc", f"--network={pkl}", "--seeds=0-3", f"--ref={ref}", "--repeats=3", "--batch=4",
                      "--steps=3")
    assert result.exit_code == 0, result.output
    expected = []
    for first in (0, 4, 8):
        images = generate_images(net, list(range(first, first + 4)), sampler=PaperSampler(num_steps=3))
        features = fid_detector(images).numpy()
        mu, sigma = feature_statistics(features)
        expected.append(float(np.sum(mu ** 2) + np.trace(sigma)))
    lines = result.output.strip().splitlines()
    for first, value in zip((0, 4, 8), expected):
        line = next(line for line in lines if line.startswith(f"seeds {first}..{first + 3}: FID "))
        assert float(line.split()[-1]) == pytest.approx(value, rel=1e-5)
    summary = next(line for line in lines if line.startswith("FID over 3 seed sets: "))
    numbers = [float(part.split()[-1]) for part in summary.removeprefix("FID over 3 seed sets: ").split(", ")]
    assert numbers == pytest.approx([min(expected), np.mean(expected), np.std(expected, ddof=1)], rel=1e-4)
    assert float(lines[-1]) == pytest.approx(min(expected), rel=1e-5)
    refused = _fid_cli("calc", f"--network={pkl}", f"--ref={ref}", "--repeats=2", "--guidance=1,2", "--gnet=uncond")
    assert refused.exit_code != 0 and "--repeats=2 goes with --network and one --guidance weight" in refused.output
