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


def test_quickstart_smoke_autoguided_by_its_own_earlier_snapshot_produces_every_artefact(tmp_path, fid_cache_dir):
    """The whole job through the real CLIs, as the cpu preset runs it (an EDM2 network trained by 2 processes, its
    autoguidance by --guide=earlier, --few-step): the main run stops at guide_share of its duration, that snapshot is
    the guide, and the run resumes from its state to the end; FID is then measured in memory at w = 1 (unguided) and
    2, and the grid made at the better; the network is then consistency-tuned by 2 processes and measured at NFE 1
    and 2. The evaluation's other paths (generate.py's images then fid.py; one weight alone) are checked stage by
    stage below."""
    from quickstart import PRESETS
    outdir = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "quickstart.py", "--preset=smoke", "--autoguidance", "--guide=earlier",
                             "--guidance=1,2", "--kimg=0.064", "--few-step", f"--outdir={outdir}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["preset"] == "smoke" and (summary["num_eval"], summary["num_ref"]) == (16, 32)
    assert set(summary["fid_by_guidance"]) == {"1", "2"} and summary["fid_unguided"] == summary["fid_by_guidance"]["1"]
    best = summary["best_guidance"]
    assert summary["fid"] == summary["fid_by_guidance"][f"{best:g}"] == min(summary["fid_by_guidance"].values())
    assert all(math.isfinite(fid) and fid > 0 for fid in summary["fid_by_guidance"].values())
    assert math.isfinite(summary["real_data_floor"]) and summary["real_data_floor"] > 0
    assert summary["guide"] == "earlier" and len(summary["stages"]) == 13
    assert PIL.Image.open(summary["guidance_plot"]).format == "PNG"
    assert "samples' FID" in result.stdout and "real-data floor" in result.stdout and "Finished in" in result.stdout
    assert f"(16 generated vs. 32 reference images; autoguided at w = {best:g}, the best of 1,2; guide 0.0 kimg)" in \
        result.stdout
    assert ("unguided FID" in result.stdout) == (best != 1)

    # The stages ran the real command lines, in order.
    commands = (outdir / "commands.txt").read_text().splitlines()
    scripts = [next(word for word in line.split() if word.endswith(".py")) for line in commands]
    assert scripts == ["dataset_tool.py", "dataset_tool.py", "fid.py", "fid.py", "train.py", "train.py", "fid.py",
                       "generate.py", "train.py", "fid.py", "fid.py", "generate.py", "plot_run.py"]
    assert all("--nproc_per_node=2" in commands[i] for i in (4, 5, 8))  # The training runs: 2 processes each.
    share = PRESETS["smoke"].guide_share
    assert f"--duration={0.000064 * share:g}" in commands[4].split() and "--resume" not in commands[4]
    assert "--duration=6.4e-05" in commands[5].split() and "--resume=auto" in commands[5].split()
    assert "--gnet=" + summary["guide_snapshot"] in commands[6] and "--guidance=1,2 " in commands[6]
    assert "--plot=" in commands[6] and f"--guidance={best:g} " in commands[7]

    # Datasets: the training half, and from the held-out half the reference images and, after them, the floor's.
    from training.data.dataset import ImageFolderDataset
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

    # Training: the guide is the run's snapshot at the split (2 of 4 batches of 16); the run went on from its state.
    run = outdir / "training"
    assert summary["guide_snapshot"] == str(run / "network-snapshot-000000.032.pkl") and summary["guide_kimg"] == 0.032
    assert summary["snapshot"] == str(run / "network-snapshot-000000.064.pkl")
    log = (run / "log.txt").read_text()
    assert "Loading training state from" in log and "Training from 0.032 to 0.064 kimg" in log
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    kimg = [s["Progress/kimg"]["mean"] for s in stats]
    assert kimg == sorted(kimg) and kimg[-1] == pytest.approx(0.064) and summary["kimg"] == kimg[-1]
    assert math.isfinite(stats[-1]["Loss/loss"]["mean"])
    from training.checkpoint import load_network
    net = load_network(summary["snapshot"])
    assert (net.img_resolution, net.img_channels, net.label_dim) == (28, 1, 10)  # Native size, class-conditional.

    # Samples: one PNG per seed, the grid, and the dashboard.
    samples = sorted(os.listdir(outdir / "samples"))
    assert samples == [f"{seed:06d}.png" for seed in range(64)]
    assert PIL.Image.open(outdir / "samples" / samples[0]).size == (28, 28)
    assert PIL.Image.open(summary["grid"]).size == (8 * 28, 8 * 28)
    assert PIL.Image.open(summary["dashboard"]).format == "PNG" and "training dashboard" in result.stdout

    # Few-step: distilled from the final snapshot, guided as evaluated, by 2 processes, a third of its images (whole
    # batches of 16).
    assert f"--distill={summary['snapshot']}" in commands[8] and summary["few_step_method"] == "distill"
    assert (f"--distill-guide={summary['guide_snapshot']}" in commands[8]) == (best != 1)
    assert summary["few_step_teacher_guidance"] == best and summary["few_step_minutes"] > 0
    assert summary["few_step_kimg"] == 0.032 and summary["few_step_snapshot"].endswith("network-snapshot-000000.032.pkl")
    assert set(summary["fid_few_step"]) == {"1", "2"} and all(math.isfinite(f) for f in summary["fid_few_step"].values())
    assert PIL.Image.open(summary["few_step_grid"]).size == (8 * 28, 8 * 28)


class RecordingStage:
    """Stands in for ``quickstart.Stage``: records each stage's title and command line, and answers as fid.py does
    (its last line the FID alone; with several weights, one 'guidance W: FID F' line each)."""

    def __init__(self):
        self.commands = []

    def run(self, title, args, launch=None):
        return self.run_output(title, args, launch).splitlines()[-1]

    def run_output(self, title, args, launch=None):
        self.commands.append((title, args))
        return "guidance 1: FID 3.5\nguidance 2: FID 2.5\n" if "--plot" in " ".join(args) else "FID 12.5\n"


def _job(tmp_path, **options):
    import quickstart
    job = quickstart.resolve_job("smoke", str(tmp_path / "qs"), "cpu", kimg=None, minutes=None, **options)
    return dataclasses.replace(job, stage=RecordingStage())


def test_unguided_evaluation_generates_the_images_then_measures_them(tmp_path):
    """Without autoguidance: generate.py writes num_eval PNGs and the grid with the preset's sampler options, then
    fid.py calc measures that folder against the reference."""
    from quickstart import Trained, evaluate
    job = _job(tmp_path, autoguidance=None, guidance=None, guide=None)
    trained = Trained(snapshot="net.pkl", kimg=0.064)
    evaluation = evaluate(job, trained, "ref.npz")
    (generate_title, generate), (fid_title, fid) = job.stage.commands
    samples, grid = str(tmp_path / "qs" / "samples"), str(tmp_path / "qs" / "samples-grid.png")
    assert generate_title == "Generate 16 images (EDM Heun sampler, 4 steps)"
    assert generate == ["generate.py", "--network=net.pkl", f"--outdir={samples}", "--seeds=0-15", f"--grid={grid}",
                        "--steps=4", "--batch=16", "--device=cpu"]
    assert fid_title == "FID of the generated images"
    assert fid == ["fid.py", "calc", f"--images={samples}", "--ref=ref.npz", "--num=16", "--batch=16", "--device=cpu"]
    assert (evaluation.fid, evaluation.samples, evaluation.grid, evaluation.best_weight) == (12.5, samples, grid, None)


def test_one_guidance_weight_is_measured_alone_and_its_grid_made(tmp_path):
    """One weight: fid.py calc in memory at that weight without a sweep plot (its FID the last line), then 64 guided
    images; several weights: the sweep's lines are read and the grid made at the best."""
    from quickstart import Trained, evaluate
    trained = Trained(snapshot="net.pkl", kimg=0.064, guide_snapshot="guide.pkl")
    job = _job(tmp_path / "one", autoguidance=True, guidance=(2.0,), guide="earlier")
    evaluation = evaluate(job, trained, "ref.npz")
    (_, fid), (title, generate) = job.stage.commands
    assert fid[:5] == ["fid.py", "calc", "--network=net.pkl", "--gnet=guide.pkl", "--guidance=2"]
    assert not any(arg.startswith("--plot") for arg in fid)
    assert title == "Generate 64 images autoguided at the best weight, w = 2" and "--guidance=2" in generate
    assert "--seeds=0-63" in generate and (evaluation.fid, evaluation.best_weight) == (12.5, 2.0)
    assert evaluation.fid_by_weight == {2.0: 12.5}
    job = _job(tmp_path / "two", autoguidance=True, guidance=(1.0, 2.0), guide="earlier")
    evaluation = evaluate(job, trained, "ref.npz")
    assert evaluation.fid_by_weight == {1.0: 3.5, 2.0: 2.5} and evaluation.best_weight == 2.0
    assert "--guidance=2" in job.stage.commands[-1][1]


def test_training_runs_share_the_budget_or_the_duration_with_the_guide():
    """Without autoguidance one run gets all the minutes; a 'smaller' guide is its own run with guide_options and
    guide_share of the minutes (or of the duration); an 'earlier' guide splits the main run at guide_share, the
    second part resuming from the first's state."""
    from quickstart import PRESETS, render, training_runs
    p = dataclasses.replace(PRESETS["cpu"], guide_share=0.25)
    minutes = lambda run: run.options["max-minutes"]
    (plain,) = training_runs(p, False, 8.0, "N")
    assert (plain.outdir, minutes(plain), plain.guide) == ("training", 8.0, False)
    guide, main = training_runs(dataclasses.replace(p, guide="smaller"), True, 8.0, "N")
    assert (guide.outdir, minutes(guide), guide.guide, guide.options["cbase"]) == ("guide", 2.0, True, 16)
    assert (main.outdir, minutes(main), main.guide, main.options["cbase"]) == ("training", 6.0, False, 32)
    first, rest = training_runs(dataclasses.replace(p, guide="earlier"), True, 8.0, "N")
    assert (first.outdir, minutes(first), first.guide, first.options.get("resume")) == ("training", 2.0, True, None)
    assert (rest.outdir, minutes(rest), rest.guide, rest.options.get("resume")) == ("training", 6.0, False, "auto")
    assert first.options["cbase"] == rest.options["cbase"] == 32
    # Without a budget: the preset's --duration (0.3 Mimg), its share for the guide.
    guide, main = training_runs(dataclasses.replace(p, guide="smaller"), True, None, "N")
    assert "--duration=0.075" in render(guide.options) and "--duration=0.3" in render(main.options)
    first, rest = training_runs(dataclasses.replace(p, guide="earlier"), True, None, "N")
    assert "--duration=0.075" in render(first.options) and "--duration=0.3" in render(rest.options)
    assert "max-minutes" not in {**first.options, **rest.options}


@pytest.mark.parametrize("fp32", [False, True], ids=["bf16-machine", "fp32-machine"])
def test_every_stage_parses_the_options_the_job_gives_it(fp32):
    """What the job passes to train.py (both parts of a split run), generate.py and fid.py calc parses there, with
    the bf16 options kept (a machine with bf16) or dropped: fid.py calc once lacked --precision, which stopped the
    job only on CPUs with bf16 instructions."""
    import fid
    import generate
    import train
    from quickstart import PRESETS, adapt_preset, render, sampler_args, training_runs
    for name, preset in PRESETS.items():
        p = adapt_preset(preset, None, fp32=fp32)
        for guide in ("smaller", "earlier"):
            for run in training_runs(dataclasses.replace(p, guide=guide), True, 10.0, "N"):
                train.main.make_context("train.py", ["--outdir=o", "--data=d", *render(run.options), "--duration=0.01"])
        generate.main.make_context("generate.py", ["--network=n", "--gnet=g", "--guidance=2", "--outdir=o",
                                                   "--seeds=0-63", *sampler_args(p), "--device=cpu"])
        fid.calc.make_context("calc", ["--network=n", "--gnet=g", "--guidance=2", "--ref=r", "--num=10",
                                       *sampler_args(p), "--device=cpu"])
        bf16 = preset.sampler_options.get("precision") == "bf16"
        assert (p.sampler_options.get("precision") == "bf16") == (not fp32 and bf16)


def test_a_preset_option_no_stage_knows_stops_the_job_before_any_stage(tmp_path, monkeypatch):
    """Every preset's options parse with the real command lines; a renamed or mistyped one (or a bad value) stops
    the job at once, before any stage or output folder, with one line that names the preset, the script and the
    option."""
    import quickstart
    from click.testing import CliRunner
    for name, preset in quickstart.PRESETS.items():
        quickstart.check_preset(name, preset)
    smoke = quickstart.PRESETS["smoke"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # main sets it; restored after the test.
    monkeypatch.setattr(quickstart.Stage, "run_output", lambda *args: pytest.fail("a stage ran"))
    outdir = tmp_path / "qs"
    misspelt = {**smoke.train_options, "lr-decy": 500}
    for changes, script, option in [(dict(train_options=misspelt), "train.py", "--lr-decy"),
                                    (dict(guide_options={"cbase": "wide"}), "train.py", "--cbase"),
                                    (dict(sampler_options={"S-churn": 40}), "generate.py", "--S-churn")]:
        monkeypatch.setitem(quickstart.PRESETS, "smoke", dataclasses.replace(smoke, **changes))
        result = CliRunner().invoke(quickstart.main, ["--preset=smoke", f"--outdir={outdir}"])
        assert result.exit_code == 1 and result.stdout == "" and not outdir.exists(), result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"Error: preset smoke: {script} rejects its options: ") and f"'{option}'" in line


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
    assert cpu.minutes == 15 and cpu.train_options["duration"] == 0.3
    assert "max-minutes" not in cpu.train_options  # The budget sets it at run time.
    longer = adapt_preset(cpu, kimg=75, fp32=False)
    assert longer.train_options == {**cpu.train_options, "duration": 0.075} and longer.train_options["bf16"]
    assert longer.minutes is None  # Exactly 75 kimg, however long.
    assert longer.sampler_options == cpu.sampler_options
    assert adapt_preset(cpu, kimg=None, fp32=False, minutes=30).minutes == 30
    assert adapt_preset(cpu, kimg=None, fp32=False).minutes == 15
    gpu = PRESETS["gpu"]
    plain = adapt_preset(gpu, kimg=None, fp32=True)
    assert plain.train_options == {k: v for k, v in gpu.train_options.items() if k != "bf16"}
    assert plain.sampler_options == {"S_churn": 40} and plain.minutes is None


def test_options_render_as_command_line_flags():
    """Each option becomes --flag=value in order: floats as :g (the same text as --kimg's duration), booleans as
    click's 1 or 0, an empty value kept (--attn= means no attention)."""
    from quickstart import render
    options = {"lr-decay": 500, "lr": 0.04, "duration": 0.064 / 1000, "bf16": True, "cond": False, "attn": "",
               "cres": "1,1,2", "S_churn": 40}
    assert render(options) == ["--lr-decay=500", "--lr=0.04", "--duration=6.4e-05", "--bf16=1", "--cond=0", "--attn=",
                               "--cres=1,1,2", "--S_churn=40"]


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
    from quickstart import PRESETS, measure_costs
    p = PRESETS["smoke"]
    costs = measure_costs(p, small_zip, "cpu", guide_options={**p.train_options, "cbase": 64}, batch=4)
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
    from quickstart import PRESETS, Launch, training_launch
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    p = PRESETS["cpu"]
    two = training_launch(p, on_cpu=True, cores=2)
    assert two.launcher == ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--")
    assert two.env == {"OMP_NUM_THREADS": "1"} and two.processes == 2
    assert training_launch(p, on_cpu=True, cores=16).env == {"OMP_NUM_THREADS": "8"}
    assert training_launch(p, on_cpu=True, cores=1) == Launch()
    assert training_launch(p, on_cpu=False, cores=16) == Launch()
    one = dataclasses.replace(p, cpu_processes=1)
    assert training_launch(one, on_cpu=True, cores=16) == Launch()
    odd = dataclasses.replace(p, train_options={**p.train_options, "batch": 33})
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


def test_few_step_tunes_a_third_of_the_images_then_measures_nfe_1_and_2(tmp_path, monkeypatch):
    """--few-step: train.py --consistency from the trained snapshot for a third of its kimg with the preset's tuning
    options, fid.py calc at NFE 1 and 2 with the consistency sampler (the preset's class and precision options, none
    of its sampler's), and 64 one-step images in a grid; the summary reports both FIDs."""
    import quickstart
    from quickstart import Datasets, Trained, tune_few_step
    job = dataclasses.replace(_job(tmp_path, autoguidance=None, guidance=None, guide=None), few_step=True,
                              preset=dataclasses.replace(quickstart.PRESETS["cpu"], num_eval=16,
                                                         few_step_method="ect"))
    monkeypatch.setattr(quickstart, "newest_snapshot",
                        lambda folder: os.path.join(folder, "network-snapshot-000020.016.pkl"))
    data = Datasets("train.zip", "reference.zip", "held-out.zip")
    tuned = tune_few_step(job, data, Trained(snapshot="net.pkl", kimg=60.0), "ref.npz")
    (tune_title, tune), (_, fid1), (_, fid2), (grid_title, generate) = job.stage.commands
    assert tune_title == "Tune into a consistency model for 20 kimg (ECT)"
    assert tune[:5] == ["train.py", f"--outdir={tmp_path / 'qs' / 'few-step'}", "--nosubdir", "--data=train.zip",
                        "--workers=0"]
    assert tune[-3:] == ["--consistency", "--transfer=net.pkl", "--device=cpu"]
    assert "--duration=0.02" in tune and "--lr=0.005" in tune and "--ema=0.002" in tune and "--lr-decay=0" in tune
    snapshot = str(tmp_path / "qs" / "few-step" / "network-snapshot-000020.016.pkl")
    for nfe, fid in ((1, fid1), (2, fid2)):
        assert fid[:6] == ["fid.py", "calc", f"--network={snapshot}", "--ref=ref.npz", "--num=16", f"--nfe={nfe}"]
        assert "--sampler=consistency" in fid and "--class=balanced" in fid
        assert not any(a.startswith(("--steps-schedule", "--sampler=unipc")) for a in fid)
    assert grid_title == "Generate 64 one-step images" and "--nfe=1" in generate and "--seeds=0-63" in generate
    assert tuned.fid_by_nfe == {1: 12.5, 2: 12.5} and tuned.kimg == 20.016  # What the snapshot trained, whole batches.
    assert tuned.grid == str(tmp_path / "qs" / "few-step-grid.png")


def test_few_step_distils_the_teacher_as_evaluated():
    """few_step_method 'distill': train.py --distill of the trained snapshot, autoguided by the job's guide at the
    evaluation's best weight (none where the best was w = 1 or the job has no guide); 'ect' tunes it alone."""
    import quickstart
    from quickstart import Evaluation, Trained, few_step_teacher_args
    p = dataclasses.replace(quickstart.PRESETS["cpu"], few_step_method="distill")
    trained = Trained(snapshot="net.pkl", kimg=60.0, guide_snapshot="guide.pkl")
    best = Evaluation(fid=20.0, samples="s", grid="g", fid_by_weight={1.0: 30.0, 2.5: 20.0}, best_weight=2.5)
    assert few_step_teacher_args(p, trained, best) == (
        ["--distill=net.pkl", "--distill-guide=guide.pkl", "--distill-guidance=2.5"], 2.5)
    unguided = dataclasses.replace(best, best_weight=1.0)
    assert few_step_teacher_args(p, trained, unguided) == (["--distill=net.pkl"], 1.0)
    assert few_step_teacher_args(p, Trained("net.pkl", 60.0), None) == (["--distill=net.pkl"], 1.0)
    ect = dataclasses.replace(p, few_step_method="ect")
    assert few_step_teacher_args(ect, trained, best) == (["--consistency", "--transfer=net.pkl"], 1.0)
