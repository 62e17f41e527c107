"""The main job (quickstart.py) at smoke size, through the real CLIs: every promised artefact appears."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_smoke_produces_every_artefact(tmp_path, fid_cache_dir):
    outdir = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "quickstart.py", "--preset=smoke", f"--outdir={outdir}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["preset"] == "smoke" and (summary["num_eval"], summary["num_ref"]) == (16, 32)
    assert math.isfinite(summary["fid"]) and summary["fid"] > 0
    assert math.isfinite(summary["real_data_floor"]) and summary["real_data_floor"] > 0
    assert len(summary["stages"]) == 8
    assert "samples' FID" in result.stdout and "real-data floor" in result.stdout and "Finished in" in result.stdout
    assert "(16 generated vs. 32 reference images)" in result.stdout

    # The stages ran the real command lines, in order.
    commands = (outdir / "commands.txt").read_text().splitlines()
    scripts = [line.split()[2] for line in commands]
    assert scripts == ["dataset_tool.py", "dataset_tool.py", "fid.py", "fid.py", "train.py", "generate.py", "fid.py",
                       "plot_run.py"]

    # Datasets: the training half, and from the held-out half the reference images and, after them, the floor's.
    from training.dataset import ImageFolderDataset
    train = ImageFolderDataset(str(outdir / "train.zip"))
    held_out = ImageFolderDataset(str(outdir / "held-out.zip"))
    reference = ImageFolderDataset(str(outdir / "reference.zip"))
    assert (len(train), len(held_out), len(reference), train.resolution) == (256, 16, 32, 28)
    assert not any(np.array_equal(reference[0][0], train[i][0]) for i in range(len(train)))
    assert not any(np.array_equal(held_out[0][0], image) for image in [*(train[i][0] for i in range(len(train))),
                                                                         *(reference[i][0] for i in range(32))])

    # Reference statistics in the official format.
    with np.load(outdir / "reference.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)

    # Training run: stats, log, a loadable snapshot, and sample grids.
    run = outdir / "training"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["Progress/kimg"]["mean"] >= 0.064 and math.isfinite(stats[-1]["Loss/loss"]["mean"])
    assert summary["kimg"] == stats[-1]["Progress/kimg"]["mean"]
    from training.checkpoint import load_network
    net = load_network(summary["snapshot"])
    assert (net.img_resolution, net.img_channels, net.label_dim) == (28, 1, 10)  # Native size, class-conditional.

    # Samples: one PNG per seed, and the grid.
    samples = sorted(os.listdir(outdir / "samples"))
    assert samples == [f"{seed:06d}.png" for seed in range(16)]
    assert PIL.Image.open(outdir / "samples" / samples[0]).size == (28, 28)
    assert PIL.Image.open(summary["dashboard"]).format == "PNG" and "training dashboard" in result.stdout
    grid = PIL.Image.open(summary["grid"])
    assert grid.size[0] >= 4 * 28 and grid.size[1] >= 4 * 28


def test_quickstart_refuses_an_earlier_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = subprocess.run([sys.executable, "quickstart.py", "--preset=smoke", f"--outdir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --outdir=")
    assert "Traceback" not in result.stderr


def test_preset_duration_override_and_fp32_fallback():
    from quickstart import PRESETS, adapt_preset

    cpu = PRESETS["cpu"]
    assert "--max-minutes=8.5" in cpu.train_args and "--duration=0.1" in cpu.train_args
    longer = adapt_preset(cpu, kimg=75, fp32=False)
    assert "--duration=0.075" in longer.train_args and "--bf16=1" in longer.train_args
    assert not any(a.startswith("--max-minutes") for a in longer.train_args)  # Exactly 75 kimg, however long.
    assert len(longer.train_args) == len(cpu.train_args) - 1 and longer.generate_args == cpu.generate_args
    plain = adapt_preset(PRESETS["gpu"], kimg=None, fp32=True)
    assert "--bf16=1" not in plain.train_args and "--precision=bf16" not in plain.generate_args
    assert "--S_churn=40" in plain.generate_args and plain.train_args[-1] == "--seed=0"


def test_bf16_dropped_on_cpus_without_bf16_instructions(tmp_path):
    from quickstart import cpu_lacks_bf16

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_lacks_bf16("cpu", cpuinfo=str(with_bf16))
    assert cpu_lacks_bf16("cpu", cpuinfo=str(without))
    assert cpu_lacks_bf16("cpu", cpuinfo=str(tmp_path / "missing"))  # Cannot tell: fp32.
    assert not cpu_lacks_bf16("cuda", cpuinfo=str(without))  # GPUs are cuda_lacks_bf16's to judge.
