"""training/loop/monitor.py and its place in the loop: the loss by noise level (per-image losses summed per sigma bucket
on the device), and FID/KID/FD-DINOv2 during training (the number fid.py gives for the same snapshot, seeds and count;
metrics.jsonl; resume still bit-exact with metrics on)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import FASHION_MNIST_T10K, make_tiny_net, tiny_training_run
from test_dinov2 import dinov2_checkpoint, tiny_dinov2  # noqa: F401 (fixtures)
from test_training_loop import assert_same_tensors, tiny_config
from torch_utils.training_stats import StatsCollector
from training.loop.monitor import SIGMA_EDGES, LossBySigma, sigma_bucket_names
from training.loop.step import train_step
from training.loop.training_loop import training_loop
from training.loop.state import read_state_file
from training.run_files import newest_state_file


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory) -> str:
    """8 Fashion-MNIST images at 16x16 with labels: a reference that the FID detector reads in a second."""
    from training.data.convert import convert_dataset

    dest = str(tmp_path_factory.mktemp("eight") / "fmnist16-8.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, max_images=8, resolution=(16, 16), workers=1, progress=False)
    return dest


@pytest.fixture
def closed_form_frechet(monkeypatch):
    """A Frechet distance that costs nothing on 2048 dimensions, |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2), used by
    every caller of metrics.evaluate (the general one is tested in test_frechet.py)."""
    import metrics.evaluate

    def frechet(mu1, sigma1, mu2, sigma2):
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))
    monkeypatch.setattr(metrics.evaluate, "frechet_distance", frechet)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# Loss by noise level.

def test_bucket_names_cover_the_sampling_range():
    names = sigma_bucket_names()
    assert names[0] == "Loss/sigma_0.002-0.01" and names[-1] == "Loss/sigma_20-80"
    assert len(names) == len(SIGMA_EDGES) - 1


def test_buckets_hold_the_per_image_means_and_clamp_the_ends():
    sigma = torch.tensor([0.001, 0.003, 0.5, 0.7, 0.9, 100.0]).reshape(-1, 1, 1, 1)
    loss = torch.arange(6 * 2 * 3, dtype=torch.float32).reshape(6, 2, 3)  # Per-image means 2.5, 8.5, ...
    stats = StatsCollector()
    LossBySigma(torch.device("cpu")).report(stats, sigma, loss)
    result = stats.collect()
    per_image = loss.flatten(1).mean(1).double().numpy()
    assert result["Loss/sigma_0.002-0.01"] == pytest.approx(dict(num=2, mean=per_image[:2].mean(),
                                                                  std=per_image[:2].std()))
    assert result["Loss/sigma_0.5-1"]["mean"] == pytest.approx(per_image[2:5].mean())
    assert result["Loss/sigma_20-80"] == pytest.approx(dict(num=1, mean=per_image[5], std=0))
    assert result["Loss/sigma_1-2"]["num"] == 0 and math.isnan(result["Loss/sigma_1-2"]["mean"])


class StubLoss:
    """Each image's sigma from a fixed list, its loss the mean square of the network's output; keeps what it
    returned per image, for the test to average by hand."""

    def __init__(self):
        self.sigmas = torch.tensor([0.005, 0.3, 0.3, 3.0])
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = self.sigmas[:images.shape[0]].reshape(-1, 1, 1, 1)
        loss = net(images + sigma * 0.1, sigma, labels) ** 2
        self.seen.append((sigma.flatten(), loss.detach().double().flatten(1).mean(1)))
        return loss


def test_training_step_reports_the_loss_by_sigma_of_a_stub_loss(fashion_mnist_16_zip, tmp_path, single_thread):
    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, "cpu")  # Two rounds of 4 images per step.
    run.loss_fn = StubLoss()
    train_step(run)
    train_step(run)
    result = run.stats.collect()
    sigma = torch.cat([s for s, _ in run.loss_fn.seen])
    per_image = torch.cat([l for _, l in run.loss_fn.seen])
    assert len(sigma) == 16
    for name, lo, hi in [("Loss/sigma_0.002-0.01", 0.002, 0.01), ("Loss/sigma_0.2-0.5", 0.2, 0.5),
                         ("Loss/sigma_2-5", 2, 5)]:
        chosen = per_image[(sigma >= lo) & (sigma < hi)]
        assert result[name]["num"] == len(chosen)
        assert result[name]["mean"] == pytest.approx(chosen.mean().item(), rel=1e-12)
    assert result["Loss/sigma_5-20"]["num"] == 0


# ----------------------------------------------------------------------------
# FID/KID during training.

def test_in_training_fid_equals_fid_py_on_the_same_snapshot(eight_images, tmp_path, fid_cache_dir,
                                                           closed_form_frechet, single_thread):
    """Two evaluations (tick 0 and the end), each of the EMA and of a power-function EMA; the final EMA's FID and
    KID are what `fid.py calc --network` prints for the final snapshot, seeds 0-3, 2 steps, against the dataset
    (whose statistics the run cached, and fid.py reuses)."""
    from fid import main as fid_main

    metrics = dict(metrics=["fid", "kid"], num_images=4, num_steps=2, batch=4)
    config = tiny_config(eight_images, str(tmp_path / "run"), total_kimg=0.032, metrics_kwargs=metrics,
                         ema_stds=[0.1], grid_images=0, augment_kwargs=None)
    config["network_kwargs"] = dict(config["network_kwargs"], augment_dim=0)
    training_loop(**config)

    records = read_jsonl(os.path.join(config["run_dir"], "metrics.jsonl"))
    assert [(r["kimg"], r["network"], r["metric"]) for r in records] == [
        (k, n, m) for k in (0.016, 0.032) for n in ("ema", "ema-0.100") for m in ("fid", "kid")]
    assert all(math.isfinite(r["value"]) and r["num_images"] == 4 and r["seconds"] >= 0 for r in records)
    log = open(os.path.join(config["run_dir"], "log.txt")).read()
    assert "fid " in log.splitlines()[[i for i, l in enumerate(log.splitlines()) if l.startswith("tick 1")][0]]

    snapshot = os.path.join(config["run_dir"], "network-snapshot-000000.032.pkl")
    result = CliRunner().invoke(fid_main, ["calc", f"--network={snapshot}", "--seeds=0-3", f"--ref={eight_images}",
                                           "--steps=2", "--batch=4", "--metrics=fid,kid", "--device=cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Features of" not in result.output  # The run's cached statistics of the dataset.
    final = {r["metric"]: r["value"] for r in records if r["kimg"] == 0.032 and r["network"] == "ema"}
    assert float(result.output.strip().splitlines()[-1]) == pytest.approx(final["fid"], rel=1e-5)
    kid_line = [line for line in result.output.splitlines() if line.startswith("KID: ")][0]
    assert float(kid_line.split()[1]) == pytest.approx(final["kid"], rel=1e-4, abs=1e-7)


class FakeDetector:
    """Features that depend on every pixel (cheap): the images' 2048 first values, scaled."""

    weights_sha256 = "fake-detector-for-tests"
    preprocess_mode = "none"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.to(torch.float32).flatten(1) / 255
        return torch.nn.functional.pad(flat, [0, max(2048 - flat.shape[1], 0)])[:, :2048]


def test_resume_with_metrics_on_is_bit_exact(fashion_mnist_16_zip, tmp_path, fid_cache_dir, closed_form_frechet,
                                            monkeypatch, single_thread):
    """8 steps with metrics at every tick == 4 steps, a state, a resumed start, 4 more == 8 steps without metrics.
    The dataset's statistics are computed in the first run and read from the cache later: neither may move the
    training generators (dropout, augmentation and a loader worker are on)."""
    import metrics.detector

    monkeypatch.setattr(metrics.detector, "load_detector", lambda *args, **kwargs: FakeDetector())
    metrics_kwargs = dict(metrics=["fid"], num_images=2, num_steps=2, batch=2, every_ticks=1)
    loader = dict(num_workers=1)
    runs = {}
    for name, extra in [("with", dict(metrics_kwargs=metrics_kwargs)), ("first", dict(metrics_kwargs=metrics_kwargs,
                                                                                       total_kimg=0.064)),
                        ("without", {})]:
        runs[name] = tiny_config(fashion_mnist_16_zip, str(tmp_path / name), data_loader_kwargs=loader, **extra)
        training_loop(**runs[name])
    torch.manual_seed(12345)
    second = tiny_config(fashion_mnist_16_zip, str(tmp_path / "second"), data_loader_kwargs=loader,
                         resume_state_dump=newest_state_file(runs["first"]["run_dir"]), metrics_kwargs=metrics_kwargs)
    training_loop(**second)

    states = {name: read_state_file(newest_state_file(config["run_dir"]))
              for name, config in dict(runs, second=second).items() if name != "first"}
    for name in ("second", "without"):
        assert states[name]["cur_nimg"] == 128
        assert_same_tensors(states["with"]["net"], states[name]["net"])
        assert_same_tensors(states["with"]["ema"], states[name]["ema"])
    kimgs = [r["kimg"] for r in read_jsonl(os.path.join(runs["with"]["run_dir"], "metrics.jsonl"))]
    assert kimgs == [0.016, 0.048, 0.08, 0.112, 0.128]  # Tick 0, every tick, the end.
    assert not os.path.exists(os.path.join(runs["without"]["run_dir"], "metrics.jsonl"))
    stats = read_jsonl(os.path.join(runs["with"]["run_dir"], "stats.jsonl"))
    assert all(s["Progress/lr"]["mean"] > 0 and "Loss/sigma_0.2-0.5" in s for s in stats[1:])


def test_train_py_refuses_unknown_metrics(fashion_mnist_8_zip, tmp_path):
    from train import main

    result = CliRunner().invoke(main, [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--metrics=fid,is",
                                       "--dry-run"])
    assert result.exit_code != 0 and "unknown metric 'is'" in result.output and "Traceback" not in result.output


def test_in_training_fd_dinov2_equals_fid_py_and_shares_its_cached_reference(eight_images, tiny_dinov2, tmp_path,
                                                                             fid_cache_dir, closed_form_frechet,
                                                                             single_thread):
    """--metrics=fid,fd_dinov2 (a small DINOv2 of the same class): both metrics from one sampling pass, each the
    number `fid.py calc --network --ref=DATASET` prints for the same network, seeds and steps, which reads both
    statistics of the dataset from the cache the run wrote."""
    from fid import main as fid_main
    from training.checkpoint import save_network_pkl
    from training.loop.monitor import InTrainingMetrics, MetricsOptions

    options = MetricsOptions(metrics=["fid", "fd_dinov2"], num_images=4, num_steps=2, batch=4, dinov2=tiny_dinov2)
    monitor = InTrainingMetrics(options, eight_images, torch.device("cpu"))
    net = make_tiny_net(label_dim=10, resolution=16)
    records = monitor.evaluate({"ema": net}, kimg=1.0)
    assert [(r["metric"], r["network"], r["num_images"]) for r in records] == [("fid", "ema", 4),
                                                                                ("fd_dinov2", "ema", 4)]
    assert monitor.latest.keys() == {"fid", "fd_dinov2"}

    snapshot = str(tmp_path / "net.pkl")
    save_network_pkl(snapshot, dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    result = CliRunner().invoke(fid_main, ["calc", f"--network={snapshot}", "--seeds=0-3", f"--ref={eight_images}",
                                           "--steps=2", "--batch=4", "--metrics=fid,fd_dinov2",
                                           f"--dinov2={tiny_dinov2}", "--device=cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Features of" not in result.output
    assert float(result.output.strip().splitlines()[-1]) == pytest.approx(monitor.latest["fid"], rel=1e-5)
    fd_line = [line for line in result.output.splitlines() if line.startswith("FD_DINOV2: ")][0]
    assert float(fd_line.split()[1]) == pytest.approx(monitor.latest["fd_dinov2"], rel=1e-5)


def test_train_py_without_timm_refuses_fd_dinov2_in_one_line(fashion_mnist_8_zip, tmp_path, monkeypatch):
    import sys
    from train import main

    monkeypatch.setitem(sys.modules, "timm", None)
    result = CliRunner().invoke(main, [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}",
                                       "--metrics=fid,fd_dinov2", "--dry-run"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "fd_dinov2 needs the timm package: pip install -r requirements-extras.txt" in result.output
