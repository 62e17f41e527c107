"""plot_run.py: a dashboard PNG per run with a panel for every kind of data the run wrote, an overlay of several
runs, and one clear line for a folder that is not a run."""

from __future__ import annotations

import json
import os
import shutil

import PIL.Image
import pytest
from click.testing import CliRunner

from plot_run import load_run, main, plot_runs, smooth
from test_training_loop import tiny_config
from training.loop.training_loop import training_loop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(fashion_mnist_16_zip, tmp_path_factory) -> str:
    """Four steps of the tiny run (stats, sample grids), plus metrics.jsonl as train.py --metrics writes it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = str(tmp_path_factory.mktemp("plot") / "00000-tiny")
    training_loop(**tiny_config(fashion_mnist_16_zip, run_dir, total_kimg=0.064, state_dump_ticks=None))
    torch.set_num_threads(threads)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for kimg, fid in ((0.016, 300.0), (0.064, 250.0)):
            for network in ("ema", "ema-0.050"):
                f.write(json.dumps(dict(kimg=kimg, metric="fid", value=fid, network=network, num_images=4,
                                        seconds=1.0)) + "\n")
    return run_dir


def test_dashboard_has_a_panel_for_each_kind_of_data(tiny_run, tmp_path):
    out = str(tmp_path / "dash.png")
    written = plot_runs([tiny_run], out)
    assert written == {out: ["loss", "loss by sigma", "fid", "lr and ema", "speed", "memory", "samples"]}
    assert open(out, "rb").read(8) == PNG_MAGIC and PIL.Image.open(out).size[0] >= 1000
    assert load_run(tiny_run)["grid"].endswith("samples-000000.064.png")  # The newest grid, not the data's.


def test_panels_without_data_are_left_out(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    with open(os.path.join(tiny_run, "stats.jsonl")) as src, open(bare / "stats.jsonl", "w") as dst:
        for line in src:
            stat = json.loads(line)
            dst.write(json.dumps({k: v for k, v in stat.items()
                                  if k in ("Loss/loss", "Progress/kimg", "timestamp")}) + "\n")
    assert plot_runs([str(bare)]) == {str(bare / "dashboard.png"): ["loss"]}


def test_several_runs_get_their_dashboards_and_an_overlay(tiny_run, tmp_path):
    other = str(tmp_path / "00001-copy")
    shutil.copytree(tiny_run, other)
    overlay = str(tmp_path / "both.png")
    result = CliRunner().invoke(main, [tiny_run, other, f"--out={overlay}"])
    assert result.exit_code == 0, result.output
    assert open(overlay, "rb").read(8) == PNG_MAGIC
    assert open(os.path.join(other, "dashboard.png"), "rb").read(8) == PNG_MAGIC
    assert f"{overlay}: loss, loss by sigma, fid, lr and ema, speed, memory" in result.output


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {tmp_path}: not a training run (no stats.jsonl with any "
                                                  f"tick in it)"]
    assert "no such folder" in CliRunner().invoke(main, [str(tmp_path / "missing")]).output


def test_smoothing_is_an_exponential_moving_average():
    assert smooth([0.0, 3.0, 3.0], span=2).tolist() == pytest.approx([0, 2, 8 / 3])
