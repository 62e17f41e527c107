"""plot_run.py: a dashboard PNG per run with a panel for every kind of data the run wrote, an overlay of several
runs, and one clear line for a folder that is not a run."""

from __future__ import annotations

import json
import os
import shutil

import PIL.Image
import pytest
from click.testing import CliRunner

import numpy as np

from plot_run import build_dashboard, load_run, main, plot_runs, smooth
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
    assert smooth([5.0, 1.0, 2.0], span=1).tolist() == [5, 1, 2]


# ----------------------------------------------------------------------------
# Synthetic runs in the format of training/loop/progress.py: the axes hold the data, at a scale that shows it.

BUCKETS = ("Loss/sigma_0.002-0.01", "Loss/sigma_0.2-0.5", "Loss/sigma_20-80")


def stat(mean: float, num: int = 8) -> dict:
    return dict(num=num, mean=mean, std=0.1)


def write_run(run_dir, losses: list[float], by_sigma: list[tuple[float, ...]], metrics: list[dict] | None = None):
    """stats.jsonl with tick i at kimg 0.5 i, its loss and its loss in each of BUCKETS; metrics.jsonl if given."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "stats.jsonl"), "w") as f:
        for tick, (loss, buckets) in enumerate(zip(losses, by_sigma)):
            line = {"Progress/tick": stat(tick, 1), "Progress/kimg": stat(0.5 * tick, 1), "Loss/loss": stat(loss)}
            line.update((name, stat(value)) for name, value in zip(BUCKETS, buckets))
            f.write(json.dumps(dict(line, timestamp=1e9 + tick)) + "\n")
    if metrics is not None:
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(record, num_images=64, seconds=1.0)) + "\n" for record in metrics)
    return str(run_dir)


# EDM2: the loss with its learned log-variance term starts near 1 and goes below zero.
EDM2_LOSS = [1.1, 0.4, -0.2, -0.6, -0.9, -1.0]
EDM2_BY_SIGMA = [(1.5, 1.2, 1.0), (0.2, 0.5, 0.3), (-0.5, -0.1, -0.2), (-0.9, -0.4, -0.5), (-1.2, -0.6, -0.8),
                 (-1.3, -0.7, -0.9)]
# DDPM++ (EDM's loss): positive throughout; tick 0 (the initial network) dwarfs the rest.
DDPMPP_LOSS = [40.0, 0.9, 0.6, 0.5, 0.45, 0.4]
DDPMPP_BY_SIGMA = [(500.0, 30.0, 2.0), (0.05, 0.4, 0.9), (0.03, 0.3, 0.8), (0.025, 0.28, 0.75), (0.02, 0.26, 0.7),
                   (0.02, 0.25, 0.7)]


def board_of(run_dir: str):
    """The dashboard of one run, its figure closed (the axes keep their data)."""
    import matplotlib.pyplot as plt

    board = build_dashboard([load_run(run_dir)], "test")
    plt.close(board.figure)
    return board


def assert_limits_hold_every_line(ax):
    lo, hi = ax.get_ylim()
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()])
    assert len(values) and lo <= values.min() and values.max() <= hi, (lo, hi, values.min(), values.max())


def test_a_loss_below_zero_is_on_a_linear_axis_that_holds_it(tmp_path):
    axes = board_of(write_run(tmp_path / "edm2", EDM2_LOSS, EDM2_BY_SIGMA)).axes
    for name in ("loss", "loss by sigma"):
        assert axes[name].get_yscale() == "linear", name
        assert_limits_hold_every_line(axes[name])
    raw = axes["loss"].get_lines()[0].get_ydata()
    assert list(raw) == pytest.approx(EDM2_LOSS[1:])  # Tick 0 left out.


def test_a_positive_loss_is_on_a_log_axis_that_holds_it(tmp_path):
    axes = board_of(write_run(tmp_path / "ddpmpp", DDPMPP_LOSS, DDPMPP_BY_SIGMA)).axes
    for name in ("loss", "loss by sigma"):
        assert axes[name].get_yscale() == "log", name
        assert_limits_hold_every_line(axes[name])


def test_the_smoothed_loss_of_a_short_run_is_its_loss_and_a_long_run_is_averaged_over_10_ticks(tmp_path):
    """A 13-tick run smoothed over 10 ticks showed a loss of 0.9 at its end where every tick after the third logged
    below 0.1: tick 0's loss of 11.5 carried through. Tick 0 is left out, and a tenth of the run, at most 10 ticks,
    is the window."""
    short = [11.5, 1.4, 0.06] + [0.05 - 0.01 * i for i in range(10)]
    lines = board_of(write_run(tmp_path / "short", short, [(1.0, 1.0, 1.0)] * len(short))).axes["loss"].get_lines()
    assert list(lines[1].get_ydata()) == pytest.approx(short[1:])  # Tick 0 left out, the rest as logged.
    assert list(lines[1].get_xdata()) == pytest.approx([0.5 * tick for tick in range(1, len(short))])
    assert board_of(str(tmp_path / "short")).axes["loss"].get_title() == "Training loss"
    long = [40.0, 7.0] + [1.0 + (i % 2) for i in range(198)]  # Alternating 1 and 2 after two large first ticks.
    lines = board_of(write_run(tmp_path / "long", long, [(1.0, 1.0, 1.0)] * len(long))).axes["loss"].get_lines()
    alpha = 2 / 11
    expected, acc = [], None
    for v in long[1:]:
        acc = v if acc is None else acc + alpha * (v - acc)
        expected.append(acc)
    assert list(lines[1].get_ydata()) == pytest.approx(expected)
    assert board_of(str(tmp_path / "long")).axes["loss"].get_title() == "Training loss (smoothed)"
    assert 1.4 < lines[1].get_ydata()[-1] < 1.6  # The mean of 1 and 2, tick 1 forgotten.


def test_loss_by_sigma_leaves_out_tick_0_when_later_ticks_exist(tmp_path):
    ax = board_of(write_run(tmp_path / "ddpmpp", DDPMPP_LOSS, DDPMPP_BY_SIGMA)).axes["loss by sigma"]
    shown = [tuple(line.get_ydata()) for line in ax.get_lines()]
    assert DDPMPP_BY_SIGMA[0] not in shown and tuple(DDPMPP_BY_SIGMA[-1]) in shown
    assert "0 kimg" not in [line.get_label() for line in ax.get_lines()]
    assert ax.get_ylim()[1] < 10  # Scaled by the trained curves, not by the initial network's 500.
    only = board_of(write_run(tmp_path / "one", DDPMPP_LOSS[:1], DDPMPP_BY_SIGMA[:1])).axes["loss by sigma"]
    assert [tuple(line.get_ydata()) for line in only.get_lines()] == [DDPMPP_BY_SIGMA[0]]


def test_metrics_panels_come_with_metrics_jsonl_a_line_per_network(tmp_path):
    assert not {"fid", "kid", "fd_dinov2"} & set(board_of(write_run(tmp_path / "bare", EDM2_LOSS, EDM2_BY_SIGMA)).axes)
    records = [dict(kimg=kimg, metric=metric, value=value + (network == "ema-0.100"), network=network)
               for kimg, fid in ((2.0, 40.0), (0.5, 90.0), (1.0, 60.0))  # Out of order, as after a resume.
               for metric, value in (("fid", fid), ("kid", fid / 1000), ("fd_dinov2", 10 * fid))
               for network in ("ema", "ema-0.100")]
    axes = board_of(write_run(tmp_path / "metrics", EDM2_LOSS, EDM2_BY_SIGMA, records)).axes
    assert list(axes)[:5] == ["loss", "loss by sigma", "fid", "kid", "fd_dinov2"]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes["fid"].get_lines()}
    assert lines == {"ema": ([0.5, 1.0, 2.0], [90.0, 60.0, 40.0]), "ema-0.100": ([0.5, 1.0, 2.0], [91.0, 61.0, 41.0])}
    assert [list(line.get_ydata()) for line in axes["kid"].get_lines()][0] == pytest.approx([0.09, 0.06, 0.04])
    assert axes["fd_dinov2"].get_title().startswith("FD-DINOv2") and len(axes["fd_dinov2"].get_lines()) == 2


def test_bad_jsonl_is_one_line_and_a_half_written_last_line_is_skipped(tmp_path):
    run_dir = write_run(tmp_path / "run", EDM2_LOSS, EDM2_BY_SIGMA, [dict(kimg=1.0, metric="fid", network="ema")])
    result = CliRunner().invoke(main, [run_dir])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        f"Error: {os.path.join(run_dir, 'metrics.jsonl')}: record 1 has no value"]
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "stats.jsonl"), "a") as f:
        f.write('{"Progress/kimg": {"num": 1, "me')  # The training is writing this tick right now.
    assert len(load_run(run_dir)["stats"]) == len(EDM2_LOSS)
    with open(os.path.join(run_dir, "stats.jsonl"), "a") as f:
        f.write("\n{}\n")
    assert CliRunner().invoke(main, [run_dir]).output.strip().splitlines() == [
        f"Error: {os.path.join(run_dir, 'stats.jsonl')}:{len(EDM2_LOSS) + 1}: not a JSON line"]
