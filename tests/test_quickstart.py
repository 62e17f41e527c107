"""The main job (quickstart.py) at smoke size, through the real CLIs: every promised artefact appears."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import pytest

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


def test_quickstart_autoguided_by_its_own_earlier_snapshot(tmp_path, fid_cache_dir):
    """Autoguidance as the cpu preset does it (--guide=earlier, one weight): the main run stops at guide_share of
    its duration, that snapshot is the guide, and the run resumes from its state to the end; FID is then measured
    in memory at w = 2 alone (no sweep, no unguided pass) and the grid made at it. (A sweep's lines are read by
    guidance_results, below, and fid.py's sweep is tested in test_guidance.py.)"""
    from quickstart import PRESETS
    outdir = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "quickstart.py", "--preset=smoke", "--autoguidance", "--guide=earlier",
                             "--guidance=2", "--kimg=0.064", f"--outdir={outdir}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["fid_by_guidance"] == {"2": summary["fid"]} and summary["best_guidance"] == 2.0
    assert summary["fid_unguided"] is None and summary["guidance_plot"] is None and summary["guide"] == "earlier"
    assert "autoguided at w = 2; guide 0.0 kimg" in result.stdout
    commands = (outdir / "commands.txt").read_text().splitlines()
    assert [line.split()[2] for line in commands] == ["dataset_tool.py", "dataset_tool.py", "fid.py", "fid.py",
                                                       "train.py", "train.py", "fid.py", "generate.py", "plot_run.py"]
    share = PRESETS["smoke"].guide_share
    assert f"--duration={0.000064 * share:g}" in commands[4].split() and "--resume" not in commands[4]
    assert "--duration=6.4e-05" in commands[5].split() and "--resume=auto" in commands[5].split()
    # The guide is the run's snapshot at the split (2 of 4 batches of 16); the run went on from its state.
    run = outdir / "training"
    assert summary["guide_snapshot"] == str(run / "network-snapshot-000000.032.pkl") and summary["guide_kimg"] == 0.032
    assert summary["snapshot"] == str(run / "network-snapshot-000000.064.pkl") and summary["kimg"] == pytest.approx(0.064)
    log = (run / "log.txt").read_text()
    assert "Loading training state from" in log and "Training from 0.032 to 0.064 kimg" in log
    stats = [json.loads(line)["Progress/kimg"]["mean"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats == sorted(stats) and stats[-1] == pytest.approx(0.064)
    assert "--gnet=" + summary["guide_snapshot"] in commands[6] and "--guidance=2 " in commands[6]
    assert "--plot" not in commands[6] and "--guidance=2 " in commands[7]
    assert sorted(os.listdir(outdir / "samples")) == [f"{seed:06d}.png" for seed in range(64)]


def test_training_runs_share_the_budget_or_the_duration_with_the_guide():
    """Without autoguidance one run gets all the minutes; a 'smaller' guide is its own run with guide_args and
    guide_share of the minutes (or of the duration); an 'earlier' guide splits the main run at guide_share, the
    second part resuming from the first's state."""
    from quickstart import PRESETS, option_value, training_runs
    p = dataclasses.replace(PRESETS["cpu"], guide_share=0.25)
    minutes = lambda run: float(option_value(run.args, "max-minutes"))
    (plain,) = training_runs(p, False, 8.0, "N")
    assert (plain.outdir, minutes(plain), plain.guide) == ("training", 8.0, False)
    guide, main = training_runs(dataclasses.replace(p, guide="smaller"), True, 8.0, "N")
    assert (guide.outdir, minutes(guide), guide.guide, option_value(guide.args, "cbase")) == ("guide", 2.0, True, "16")
    assert (main.outdir, minutes(main), main.guide, option_value(main.args, "cbase")) == ("training", 6.0, False, "32")
    first, rest = training_runs(dataclasses.replace(p, guide="earlier"), True, 8.0, "N")
    assert (first.outdir, minutes(first), first.guide, option_value(first.args, "resume")) == ("training", 2.0, True,
                                                                                               None)
    assert (rest.outdir, minutes(rest), rest.guide, option_value(rest.args, "resume")) == ("training", 6.0, False,
                                                                                           "auto")
    assert option_value(first.args, "cbase") == option_value(rest.args, "cbase") == "32"
    # Without a budget: the preset's --duration (0.3 Mimg), its share for the guide.
    guide, main = training_runs(dataclasses.replace(p, guide="smaller"), True, None, "N")
    assert option_value(guide.args, "duration") == "0.075" and option_value(main.args, "duration") == "0.3"
    first, rest = training_runs(dataclasses.replace(p, guide="earlier"), True, None, "N")
    assert option_value(first.args, "duration") == "0.075" and option_value(rest.args, "duration") == "0.3"
    assert "max-minutes" not in " ".join(first.args + rest.args)


@pytest.mark.parametrize("fp32", [False, True], ids=["bf16-machine", "fp32-machine"])
def test_every_stage_parses_the_options_the_job_gives_it(fp32):
    """What the job passes to train.py (both parts of a split run), generate.py and fid.py calc parses there, with
    the bf16 options kept (a machine with bf16) or dropped: fid.py calc once lacked --precision, which stopped the
    job only on CPUs with bf16 instructions."""
    import fid
    import generate
    import train
    from quickstart import PRESETS, adapt_preset, training_runs
    for name, preset in PRESETS.items():
        p = adapt_preset(preset, None, fp32=fp32)
        sampler_args = [f"--steps={p.steps}", f"--batch={p.batch}", *p.generate_args, "--device=cpu"]
        for run in training_runs(p, True, 10.0, "N"):
            train.main.make_context("train.py", ["--outdir=o", "--data=d", *run.args, "--duration=0.01"])
        generate.main.make_context("generate.py", ["--network=n", "--gnet=g", "--guidance=2", "--outdir=o",
                                                   "--seeds=0-63", *sampler_args])
        fid.calc.make_context("calc", ["--network=n", "--gnet=g", "--guidance=2", "--ref=r", "--num=10",
                                       *sampler_args])
        assert ("--precision=bf16" in p.generate_args) == (not fp32 and "--precision=bf16" in preset.generate_args)


def test_quickstart_refuses_an_earlier_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = subprocess.run([sys.executable, "quickstart.py", "--preset=smoke", f"--outdir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --outdir=")
    assert "Traceback" not in result.stderr


def test_preset_duration_override_budget_and_fp32_fallback():
    from quickstart import PRESETS, adapt_preset

    cpu = PRESETS["cpu"]
    assert cpu.minutes == 15 and "--duration=0.3" in cpu.train_args
    assert not any(a.startswith("--max-minutes") for a in cpu.train_args)  # The budget sets it at run time.
    longer = adapt_preset(cpu, kimg=75, fp32=False)
    assert "--duration=0.075" in longer.train_args and "--bf16=1" in longer.train_args
    assert longer.minutes is None  # Exactly 75 kimg, however long.
    assert len(longer.train_args) == len(cpu.train_args) and longer.generate_args == cpu.generate_args
    assert adapt_preset(cpu, kimg=None, fp32=False, minutes=30).minutes == 30
    assert adapt_preset(cpu, kimg=None, fp32=False).minutes == 15
    plain = adapt_preset(PRESETS["gpu"], kimg=None, fp32=True)
    assert "--bf16=1" not in plain.train_args and "--precision=bf16" not in plain.generate_args
    assert "--S_churn=40" in plain.generate_args and plain.train_args[-1] == "--seed=0" and plain.minutes is None


def test_options_replace_by_name():
    from quickstart import option_value, with_options
    args = ("--cbase=32", "--seed=0", "--cres=1,2,2")
    assert with_options(args, "--cbase=16", "--max-minutes=3.5") == ("--seed=0", "--cres=1,2,2", "--cbase=16",
                                                                      "--max-minutes=3.5")
    assert option_value(args, "cres") == "1,2,2" and option_value(args, "arch", "ddpmpp") == "ddpmpp"


def test_evaluation_prediction_and_training_minutes_follow_the_stages():
    """The prediction is the sum of the evaluation stages' work at the measured per-image costs: n images of NFE
    network calls plus n Inception passes (each CLI's start and the dashboard added); with autoguidance, each
    weight costs n Inception passes and n x NFE calls of the network, plus the guide's where w != 1, and a guided
    64-image grid follows."""
    from quickstart import DASHBOARD_SECONDS, PRESETS, STARTUP_SECONDS, Costs, training_minutes
    p = PRESETS["cpu"]
    costs = Costs(net=0.004, inception=0.1, guide=0.001)
    fixed = 2 * STARTUP_SECONDS + DASHBOARD_SECONDS
    assert costs.evaluation(p, nfe=35) == pytest.approx(1000 * 35 * 0.004 + 1000 * 0.1 + fixed)
    unguided, guided = 1000 * 35 * 0.004, 1000 * 35 * 0.005
    assert costs.evaluation(p, nfe=35, weights=(1.0, 1.5, 2.0)) == pytest.approx(
        unguided + 2 * guided + 3 * 1000 * 0.1 + 64 * 35 * 0.005 + fixed)
    assert costs.evaluation(p, nfe=35, weights=(2.0,)) == pytest.approx(guided + 1000 * 0.1 + 64 * 35 * 0.005 + fixed)
    # 15 minutes, 6 spent, 4 predicted (x 1.15 margin) and one CLI start: 15 - 6 - 4.6 - 8 / 60 minutes to train;
    # two training runs (autoguidance) start twice.
    assert training_minutes(15, 360, 240) == pytest.approx(15 - 6 - 4.6 - STARTUP_SECONDS / 60)
    assert training_minutes(15, 360, 240, starts=2) == pytest.approx(15 - 6 - 4.6 - 2 * STARTUP_SECONDS / 60)


def test_seconds_per_call_is_the_median_after_a_warm_up():
    """The untimed first call (here the slowest) is left out, and the median of the timed ones is kept, not the
    fastest: a stage of many calls on a busy machine sees their typical time."""
    from quickstart import seconds_per_call
    delays = iter([0.6, 0.3, 0.02, 0.15])
    assert 0.15 <= seconds_per_call(lambda: time.sleep(next(delays)), repeats=3) < 0.3


@pytest.fixture
def small_zip(tmp_path) -> str:
    """16 embedded images at 28x28, converted by dataset_tool.py."""
    from quickstart import SOURCE
    data = str(tmp_path / "d.zip")
    subprocess.run([sys.executable, "dataset_tool.py", f"--source={SOURCE}", f"--dest={data}", "--resolution=28x28",
                    "--max-images=16"], cwd=REPO, check=True, capture_output=True)
    return data


def test_measured_costs_are_per_image_and_grow_with_the_network(small_zip):
    """The probe builds the preset's own network from train.py's options: a wider one costs more per call."""
    from quickstart import PRESETS, measure_costs, with_options
    p = PRESETS["smoke"]
    costs = measure_costs(p, small_zip, "cpu", guide_args=with_options(p.train_args, "--cbase=64"), batch=4)
    assert 0 < costs.net < costs.guide and 0 < costs.inception


def test_costs_are_probed_at_the_generation_batch(small_zip, monkeypatch):
    """A small batch costs more per image than generate.py's, so the probe's default batch is the preset's: with each
    timed call taking 1 s, every per-image cost is 1 / batch."""
    import quickstart
    shapes = []

    def one_second(fn, repeats=3):
        shapes.append(fn().shape[0])
        return 1.0
    monkeypatch.setattr(quickstart, "seconds_per_call", one_second)
    p = dataclasses.replace(quickstart.PRESETS["smoke"], batch=6)
    costs = quickstart.measure_costs(p, small_zip, "cpu")
    assert costs.net == pytest.approx(1 / 6) and costs.inception == pytest.approx(1 / 6) and shapes == [6, 6]


def test_training_launch_is_torchrun_with_a_share_of_the_cores_on_a_cpu(monkeypatch):
    """On a CPU the cpu preset trains in two processes (gloo), each with half the cores, the batch split evenly; one
    process where there is one core, on a GPU, or where the batch does not split."""
    from quickstart import PRESETS, Launch, training_launch, with_options
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    p = PRESETS["cpu"]
    two = training_launch(p, on_cpu=True, cores=2)
    assert two.launcher == ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--")
    assert two.env == {"OMP_NUM_THREADS": "1"} and two.processes == 2
    assert training_launch(p, on_cpu=True, cores=16).env == {"OMP_NUM_THREADS": "8"}
    assert training_launch(p, on_cpu=True, cores=1) == Launch()
    assert training_launch(p, on_cpu=False, cores=16) == Launch()
    assert training_launch(PRESETS["smoke"], on_cpu=True, cores=16) == Launch()  # cpu_processes = 1
    odd = dataclasses.replace(p, train_args=with_options(p.train_args, "--batch=33"))
    assert training_launch(odd, on_cpu=True, cores=2) == Launch()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert training_launch(p, on_cpu=True, cores=2).env == {"OMP_NUM_THREADS": "3"}


def test_stage_runs_its_command_under_the_launch_and_logs_it(tmp_path):
    """The launcher goes between python and the script, the environment reaches the child, and commands.txt shows
    both as a command line to copy."""
    from quickstart import Launch, Stage
    stage = Stage(total=1, log_path=str(tmp_path / "commands.txt"))
    launch = Launch(launcher=("-X", "utf8"), env={"QUICKSTART_TEST": "7"})
    code = "import os, sys; print(os.environ['QUICKSTART_TEST'], sys.flags.utf8_mode)"
    assert stage.run("echo", ["-c", code], launch) == "7 1"
    logged = (tmp_path / "commands.txt").read_text()
    assert logged.startswith("$ ") and shlex.split(logged[2:]) == ["QUICKSTART_TEST=7", "python", "-X", "utf8", "-c",
                                                                    code]


def test_guidance_results_are_read_from_fid_py_sweep_lines():
    from quickstart import guidance_results
    output = "Computed features\nguidance 1: FID 60.5\nguidance 1.5: FID 52.25, KID 0.01\n\n  guidance  FID\n"
    assert guidance_results(output) == {1.0: 60.5, 1.5: 52.25}
    with pytest.raises(click.ClickException):
        guidance_results("no sweep here")


def test_guidance_weights_option_keeps_the_listed_weights_and_needs_a_guided_one():
    from quickstart import parse_weights
    assert parse_weights("1,1.5,...,2.5") == (1.0, 1.5, 2.0, 2.5) and parse_weights(None) is None
    assert parse_weights("2,2,1") == (1.0, 2.0)
    for bad in ("1", "1,1", "two"):
        with pytest.raises(click.BadParameter):
            parse_weights(bad)


def test_bf16_dropped_on_cpus_without_bf16_instructions(tmp_path):
    from quickstart import cpu_lacks_bf16

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_lacks_bf16("cpu", cpuinfo=str(with_bf16))
    assert cpu_lacks_bf16("cpu", cpuinfo=str(without))
    assert cpu_lacks_bf16("cpu", cpuinfo=str(tmp_path / "missing"))  # Cannot tell: fp32.
    assert not cpu_lacks_bf16("cuda", cpuinfo=str(without))  # GPUs are cuda_lacks_bf16's to judge.
