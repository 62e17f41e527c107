"""generate.py: files as the official script names them, images as generate_images makes them, for any batch
size and number of processes; bad options get one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO_ROOT, make_tiny_net
from training.checkpoint import save_network_pkl
from training.images import image_grid
from training.sampling.generation import image_path, seed_batches
from training.sampling import generate_images, sampler_spec

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLER_ARGS = ["--steps", "4", "--S_churn", "10", "--S_min", "0.01", "--S_max", "20"]
SAMPLER_KWARGS = dict(num_steps=4, S_churn=10, S_min=0.01, S_max=20)


@pytest.fixture(scope="module")
def network_pkl(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("net") / "network-snapshot-000000.pkl")
    save_network_pkl(path, dict(ema=make_tiny_net(label_dim=4), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return path


def _read_png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(PIL.Image.open(path))).permute(2, 0, 1)


def _run(*args: str):
    from generate import main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_files_hold_the_images_of_their_seeds(network_pkl, tmp_path):
    seeds = [0, 3, 998, 999, 1000, 1234]
    result = _run("--network", network_pkl, "--outdir", str(tmp_path / "out"), "--seeds", "0,3,998-1000,1234",
                  "--subdirs", "--batch", "4", "--grid", str(tmp_path / "grid.png"), *SAMPLER_ARGS)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Generated 6 images with edm_sampler")
    # In the CLI's batches: a seed's image is the same in any batch to float rounding only (test_sampling checks the
    # float samples), and kernels chosen per batch size may round a value across a level.
    net = make_tiny_net(label_dim=4)
    expected = torch.cat([generate_images(net, seeds[i:i + 4], sampler=sampler_spec(**SAMPLER_KWARGS)) for i in (0, 4)])
    for seed, image in zip(seeds, expected):
        path = tmp_path / "out" / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"
        assert torch.equal(_read_png(path), image)
    assert sorted(os.listdir(tmp_path / "out")) == ["000000", "001000"]
    assert torch.equal(_read_png(tmp_path / "grid.png"), image_grid(expected))


def test_ablation_options_switch_the_sampler(network_pkl, tmp_path):
    result = _run("--network", network_pkl, "--outdir", str(tmp_path), "--seeds", "5", "--class", "2",
                  "--solver", "euler", "--disc", "vp", *SAMPLER_ARGS)
    assert result.exit_code == 0, result.output
    assert "with ablation_sampler" in result.output
    expected = generate_images(make_tiny_net(label_dim=4), [5], class_idx=2,
                               sampler=sampler_spec(solver="euler", discretization="vp", **SAMPLER_KWARGS))
    assert torch.equal(_read_png(tmp_path / "000005.png"), expected[0])


def test_balanced_class_option_gives_each_seed_its_class(network_pkl, tmp_path):
    result = _run("--network", network_pkl, "--outdir", str(tmp_path), "--seeds", "5,6", "--class", "balanced",
                  *SAMPLER_ARGS)
    assert result.exit_code == 0, result.output
    for seed in (5, 6):
        expected = generate_images(make_tiny_net(label_dim=4), [seed], class_idx=seed % 4,
                                   sampler=sampler_spec(**SAMPLER_KWARGS))
        assert torch.equal(_read_png(tmp_path / f"{seed:06d}.png"), expected[0])


@pytest.mark.parametrize("args, message", [
    (["--class", "4"], "--class=4: .* has classes 0..3"),
    (["--class", "even"], "Invalid value for '--class': 'even': expected a class index or 'balanced'"),
    (["--class", "-1"], "Invalid value for '--class': '-1': a class index is at least 0"),
    (["--network", "missing.pkl"], "missing.pkl: no such file"),
    (["--seeds", "3-1"], "Invalid value for '--seeds': '3-1': range end is below its start"),
    (["--disc", "cosine"], "Invalid value for '--disc'"),
])
def test_bad_options_get_one_clear_line(network_pkl, tmp_path, args, message):
    base = ["--network", network_pkl, "--outdir", str(tmp_path / "out")]
    result = _run(*base, *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_progress_counts_every_process_share():
    """Under torchrun the main process's bar advances by whole rounds: over all rounds it counts every seed once,
    and each process's batches are exactly its share."""
    from training.sampling.generation import sampling_rounds, seed_batches

    seeds = list(range(1003))
    for world_size in (1, 2, 3, 8):
        rounds = sampling_rounds(seeds, max_batch_size=64, world_size=world_size)
        assert all(len(round_batches) == world_size for round_batches in rounds)
        assert sum(len(batch) for round_batches in rounds for batch in round_batches) == len(seeds)
        for rank in range(world_size):
            assert [r[rank] for r in rounds] == seed_batches(seeds, 64, world_size)[rank::world_size]


def test_fp16_on_a_cpu_is_refused_not_silently_float32(network_pkl, tmp_path):
    result = _run("--network", network_pkl, "--outdir", str(tmp_path / "out"), "--seeds", "0", "--device", "cpu",
                  "--precision", "fp16")
    assert result.exit_code != 0
    assert "--precision=fp16: fp16 runs only on CUDA devices, and this run is on cpu" in result.output
    assert not (tmp_path / "out").exists()


def test_nothing_to_write_is_an_error(network_pkl):
    result = _run("--network", network_pkl)
    assert result.exit_code != 0 and "give --outdir and/or --grid" in result.output


def test_seed_batches_cover_the_seeds_in_order():
    seeds = list(range(10, 33))
    for max_batch, world in ((4, 1), (4, 2), (64, 3), (1, 2)):
        batches = seed_batches(seeds, max_batch, world)
        assert len(batches) % world == 0 and max(map(len, batches)) <= max_batch
        assert sum(batches, []) == seeds
        shares = [sum(map(len, batches[r::world])) for r in range(world)]
        assert max(shares) - min(shares) <= len(batches) // world


def test_image_path_follows_the_official_layout():
    assert image_path("out", 12345) == os.path.join("out", "012345.png")
    assert image_path("out", 12345, subdirs=True) == os.path.join("out", "012000", "012345.png")


def test_two_processes_write_the_same_files_as_one(network_pkl, tmp_path):
    """torchrun shards the seeds; every image must equal the single-process one (gloo on the CPU)."""
    seeds = list(range(5))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "generate.py"), "--network", network_pkl, "--outdir", str(tmp_path / "out"),
               "--seeds", "0-4", "--batch", "2", "--grid", str(tmp_path / "grid.png"), "--device", "cpu",
               *SAMPLER_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("Generated 5 images") == 1
    bar = [part for part in re.split(r"[\r\n]", result.stderr) if part.startswith("Generating")]
    assert bar and "5/5" in bar[-1]  # The main process's bar counts both processes' images.
    # In the CLI's batches: a seed's image is the same in any batch to float rounding only (test_sampling checks the
    # float samples), and kernels chosen per batch size may round a value across a level.
    net = make_tiny_net(label_dim=4)
    expected = torch.cat([generate_images(net, seeds[i:i + 4], sampler=sampler_spec(**SAMPLER_KWARGS)) for i in (0, 4)])
    for seed, image in zip(seeds, expected):
        assert torch.equal(_read_png(tmp_path / "out" / f"{seed:06d}.png"), image)
    assert torch.equal(_read_png(tmp_path / "grid.png"), image_grid(expected))


def test_grid_is_laid_out_row_by_row_with_ceil_sqrt_columns():
    """Five 2x3 images, image i filled with i + 1: 3 columns (ceil sqrt 5), 2 rows, the last cell black."""
    images = (torch.arange(1, 6, dtype=torch.uint8).reshape(5, 1, 1, 1) * torch.ones(5, 1, 2, 3, dtype=torch.uint8))
    grid = image_grid(images)
    assert grid.shape == (1, 4, 9)
    cells = grid[0, ::2, ::3]  # One pixel per cell.
    assert cells.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert torch.equal(grid[0, 2:4, 3:6], torch.full([2, 3], 5, dtype=torch.uint8))
