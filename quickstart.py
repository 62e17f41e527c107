"""The main job, end to end, on the embedded Fashion-MNIST: convert, reference statistics, train, sample, FID.

    python quickstart.py                   # picks the preset for this machine (cpu, or gpu when CUDA is there)
    python quickstart.py --preset=smoke    # a minute or two: every stage at toy size (what CI runs)

Every stage runs one of the real command lines (dataset_tool.py, fid.py, train.py, generate.py) as a
subprocess, exactly as a user would type it; this script only chooses their options and reports.
The embedded 10,000 images are split in two halves: the first trains the model, the second is held out. The
reference statistics come from the first ``num_ref`` held-out images; the real-data floor (real vs. real FID at the
same image counts, printed beside the FID of ``num_eval`` samples) is that of the next ``num_eval`` held-out images,
or of the first ``num_eval`` training images where the held-out half has too few left (the gpu preset's 5,000 +
5,000).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import click

REPO = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(REPO, "data", "fashion-mnist", "t10k-images-idx3-ubyte.gz")
NUM_SOURCE_IMAGES = 10000
HELD_OUT_START = NUM_SOURCE_IMAGES // 2

# Command-line options by flag name without the dashes ({"lr-decay": 500} is --lr-decay=500), rendered when a stage
# runs. Keyed by flag, not by click parameter name: generate.py and fid.py calc name their --batch differently.
Options = dict[str, str | int | float | bool]


def render(options: Options) -> list[str]:
    """``--flag=value`` for each option: floats as ``:g``, booleans as 1 or 0 (as click reads them)."""
    text = lambda v: str(int(v)) if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    return [f"--{flag}={text(value)}" for flag, value in options.items()]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything the job's size depends on."""
    train_images: int  # The first half of the embedded data (at most 5,000 keeps the second half held out).
    num_eval: int  # Images in the generated set and in the real set of the floor.
    num_ref: int  # Held-out real images in the reference statistics. FID's small-sample bias falls with both counts.
    train_options: Options  # train.py options beyond the data and output folder.
    steps: int = 18  # EDM Heun steps (NFE = 2 * steps - 1), unless sampler_options name a sampler and its nfe.
    batch: int = 100  # generate.py and fid.py batch size.
    sampler_options: Options = dataclasses.field(default_factory=dict)  # generate.py's and fid.py calc's, beyond
    # the network, seeds, steps and batch.
    resolution: int = 32  # 32: padded as the official dataset tool does; 28: the native Fashion-MNIST size.
    minutes: float | None = None  # The whole job's wall-clock budget; training gets what the other stages leave.
    autoguidance: bool = False  # Train a guide too and report the FID of autoguided samples (--autoguidance).
    guide: str = "smaller"  # Autoguidance: 'smaller', a separate run with guide_options; 'earlier', the main
    # network's own snapshot after guide_share of its training (no separate run; the guide's calls cost the main's).
    guide_options: Options = dataclasses.field(default_factory=dict)  # A 'smaller' guide's train.py options that
    # replace train_options'.
    guide_share: float = 0.2  # The guide's part of the training time (or of --kimg): a 'smaller' guide's run, or
    # when an 'earlier' guide's snapshot is taken.
    guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5)  # Autoguidance: the weights measured (1: unguided); the job
    # reports the best of them.
    cpu_processes: int = 1  # train.py processes on a CPU (torchrun, gloo), as many as there are cores up to this:
    # single-thread processes keep a few cores busier than the threads of one process do.
    few_step_options: Options = dataclasses.field(default_factory=lambda: dict(FEW_STEP_OPTIONS))  # --few-step: the
    # consistency tuning's train.py options that replace train_options' (docs/consistency.md).
    few_step_method: str = "distill"  # --few-step: 'distill' (consistency distillation of the teacher as evaluated:
    # autoguided at the best weight where the job guides; it measured best at NFE 1, 2 and 4, docs/consistency.md)
    # or 'ect' (consistency tuning).


# --few-step: tune the trained network for a third of its images into a consistency model (train.py --consistency),
# with a flat learning rate and a short EMA (--transfer has no EMA ramp-up), and measure it at NFE 1 and 2.
FEW_STEP_SHARE = 1 / 3
FEW_STEP_NFES = (1, 2)
FEW_STEP_OPTIONS = {"lr-rampup": 0, "lr-decay": 0, "ema": 0.002, "ema-std": "none", "grid": 0}


# What each preset's choices are for; the measurements behind them are in docs/quickstart-history.md. duration is in
# Mimg, as in train.py. The cpu preset spends its 15 minutes on training wherever it can: EDM2's network, loss and
# Adam beta2 at lr 0.04 measured best of the recipes and learning rates tried at the kimg the budget trains; 32
# channels down to 14x14 (--cres=1,1,2) make a cheaper decoder whose extra images outweigh its capacity; two
# single-thread processes; no sample grids while training (the job's grid is generate.py's); UniPC at NFE 15 reaches
# Heun's FID in fewer network calls. Balanced classes (seed mod 10) keep the classes' random spread out of the FID,
# and the network's own snapshot after a third of its training guides as well as a separate smaller network, at no
# training cost, best at w = 2.5. Its --duration only caps a run that the budget ends first.
PRESETS = {
    "cpu": Preset(train_images=5000, num_eval=1000, num_ref=1000, train_options={
        "arch": "edm2", "cond": True, "cbase": 32, "cres": "1,1,2", "blocks": 1, "attn": "", "batch": 32, "lr": 0.04,
        "lr-decay": 500, "lr-rampup": 1, "ema": 0.5, "ema-rampup": 0.1, "dropout": 0, "augment": 0, "bf16": True,
        "duration": 0.3, "tick": 5, "snap": 1000, "dump": 1000, "grid": 0, "seed": 0},
        sampler_options={"precision": "bf16", "sampler": "unipc_bh2", "nfe": 15, "steps-schedule": "loguniform",
                         "class": "balanced"}, resolution=28, minutes=15,
        autoguidance=True, guidance=(2.5,), guide="earlier", guide_share=1 / 3,
        guide_options={"cbase": 16, "seed": 1}, cpu_processes=2, few_step_options={**FEW_STEP_OPTIONS, "lr": 0.005}),
    "gpu": Preset(train_images=5000, num_eval=5000, num_ref=5000, batch=500, train_options={
        "arch": "ddpmpp", "precond": "edm", "cbase": 128, "cres": "1,2,2", "blocks": 2, "attn": "16", "batch": 256,
        "lr": 1e-3, "lr-rampup": 10, "ema": 0.5, "ema-rampup": 0.1, "dropout": 0.1, "augment": 0, "bf16": True,
        "duration": 0.3, "tick": 50, "snap": 1000, "dump": 1000, "grid": 64, "seed": 0},
        sampler_options={"precision": "bf16", "S_churn": 40}, guide_options={"cbase": 64, "seed": 1},
        few_step_options={**FEW_STEP_OPTIONS, "lr": 1e-4}),
    "smoke": Preset(train_images=256, num_eval=16, num_ref=32, steps=4, batch=16, resolution=28, train_options={
        "arch": "edm2", "cond": True, "cbase": 8, "cres": "1,1", "blocks": 1, "attn": "",
        "batch": 16, "lr": 1e-3, "lr-rampup": 0, "ema": 0.001, "dropout": 0, "augment": 0, "duration": 0.000064,
        "tick": 0.032, "snap": 1000, "dump": 1000, "grid": 16, "seed": 0},
        guide_share=0.5, guidance=(1.0, 2.0), guide_options={"seed": 1}, cpu_processes=2),
}


def sampler_args(p: Preset) -> list[str]:
    """The sampling options generate.py and fid.py calc both get."""
    return render({"steps": p.steps, "batch": p.batch, **p.sampler_options})


def check_preset(name: str, p: Preset) -> None:
    """Stop at once, in one line naming the preset, where its image counts do not fit the embedded data or where
    train.py's, generate.py's or fid.py calc's own parser rejects one of its options: a renamed option would otherwise
    stop the job only at the stage that uses it, minutes in."""
    if max(p.train_images, p.num_eval, p.num_ref) > HELD_OUT_START:
        raise click.ClickException(f"preset {name}: train_images, num_eval and num_ref must be at most "
                                   f"{HELD_OUT_START}")
    import fid
    import generate
    import train
    training = ["--outdir=o", "--data=d"]
    sampling = ["--network=n", "--gnet=g", "--guidance=2", *sampler_args(p)]
    for command, script, args in [
            (train.main, "train.py", [*training, *render(p.train_options)]),
            (train.main, "train.py", [*training, *render({**p.train_options, **p.guide_options})]),
            (train.main, "train.py", [*training, *render({**p.train_options, **p.few_step_options}),
                                      *(["--consistency", "--transfer=t"] if p.few_step_method == "ect" else
                                        ["--distill=t"])]),
            (generate.main, "generate.py", ["--outdir=o", *sampling]),
            (fid.calc, "fid.py calc", ["--ref=r", "--num=10", *sampling])]:
        try:
            command.make_context(script, args)
        except click.ClickException as e:
            message = " ".join(e.format_message().split())
            raise click.ClickException(f"preset {name}: {script} rejects its options: {message}") from None


BF16_OPTIONS = {("bf16", True), ("precision", "bf16")}


def adapt_preset(p: Preset, kimg: float | None, fp32: bool, minutes: float | None = None) -> Preset:
    """The preset with its training duration replaced by exactly ``kimg`` (if given; no time budget then), its
    budget by ``minutes`` (if given) and, with ``fp32``, its bf16 options dropped."""
    keep = lambda options: {k: v for k, v in options.items() if not (fp32 and (k, v) in BF16_OPTIONS)}
    train_options = keep(p.train_options) | ({} if kimg is None else {"duration": kimg / 1000})
    budget = None if kimg is not None else minutes if minutes is not None else p.minutes
    return dataclasses.replace(p, train_options=train_options, sampler_options=keep(p.sampler_options), minutes=budget)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a CLI starts: ``python [launcher] script ...`` with ``env`` added to the environment."""
    launcher: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    processes: int = 1


def training_launch(p: Preset, on_cpu: bool, cores: int | None = None) -> Launch:
    """How train.py starts: on a CPU, with ``p.cpu_processes`` > 1 and at least as many cores, under torchrun with
    that many processes (gloo; each takes an equal share of the global batch, so the run is the same recipe) of
    cores / processes threads each, unless OMP_NUM_THREADS is set; otherwise as one process."""
    cores = cores or os.cpu_count() or 1
    processes = min(p.cpu_processes, cores) if on_cpu else 1
    if processes <= 1 or p.train_options.get("batch", 512) % processes:
        return Launch()
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, cores // processes)))
    return Launch(launcher=("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "--"),
                  env={"OMP_NUM_THREADS": threads}, processes=processes)


class Stage:
    """Numbered stage headers, elapsed time per stage, and the commands that ran."""

    def __init__(self, total: int, log_path: str):
        self.total = total
        self.index = 0
        self.log_path = log_path
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, args: list[str], launch: Launch | None = None) -> str:
        """Run one CLI, streaming its progress to the terminal; return its stdout's last line."""
        lines = self.run_output(title, args, launch).splitlines()
        return next((line for line in reversed(lines) if line.strip()), "")

    def run_output(self, title: str, args: list[str], launch: Launch | None = None) -> str:
        """Run one CLI (under ``launch``'s launcher and environment, if given), streaming its progress to the
        terminal; return its whole stdout."""
        self.index += 1
        launch = launch or Launch()
        command = [sys.executable, *launch.launcher, *args]
        shown = shlex.join([*(f"{k}={v}" for k, v in launch.env.items()), "python", *launch.launcher, *args])
        click.secho(f"\n[{self.index}/{self.total}] {title}", bold=True)
        click.echo("$ " + shown)
        with open(self.log_path, "a") as log:
            log.write("$ " + shown + "\n")
        start = time.time()
        env = {**os.environ, **launch.env} if launch.env else None
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
        lines = []
        for line in proc.stdout:  # stderr (progress bars) goes straight to the terminal.
            sys.stdout.write(line)
            lines.append(line)
        if proc.wait() != 0:
            raise click.ClickException(f"stage {self.index} ({title}) failed with exit code {proc.returncode}; "
                                       f"its output is above")
        elapsed = time.time() - start
        self.timings.append((title, elapsed))
        click.echo(f"    done in {elapsed:.0f} s")
        return "".join(lines)


ARCH_NAMES = dict(ddpmpp="DDPM++", ncsnpp="NCSN++", adm="ADM")


def cuda_lacks_bf16(device: str | None) -> bool:
    """Whether the stages will run on a CUDA GPU without bfloat16 arithmetic (before Ampere)."""
    import torch
    if not torch.cuda.is_available() or (device is not None and not device.startswith("cuda")):
        return False
    return not torch.cuda.is_bf16_supported(including_emulation=False)


def runs_on_cpu(device: str | None) -> bool:
    """Whether the stages will run on the CPU (``device``, or the automatic choice: a CUDA GPU where there is one)."""
    import torch
    return device.startswith("cpu") if device else not torch.cuda.is_available()


def cpu_lacks_bf16(device: str | None, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the stages will run on a CPU without bfloat16 instructions (AVX-512 BF16 or AMX), where PyTorch
    emulates bf16 at many times fp32's cost. Unknown (not Linux): True."""
    if not runs_on_cpu(device):
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not {"avx512_bf16", "amx_bf16"} & set(flags)


# ----------------------------------------------------------------------------
# The time budget: training gets what the evaluation will leave, predicted from measured per-image costs.

STARTUP_SECONDS = 8  # Each CLI's start (imports, loading the network or the detector), with room to spare.
DASHBOARD_SECONDS = 3  # plot_run.py, start included.


@dataclasses.dataclass(frozen=True)
class Costs:
    """Measured seconds per image: one network call (``net``; ``guide`` for the guide, 0 without) and one
    Inception pass (``inception``)."""
    net: float
    inception: float
    guide: float = 0.0

    def sampling(self, num: int, nfe: int, guided: bool) -> float:
        return num * nfe * (self.net + (self.guide if guided else 0.0))

    def evaluation(self, p: Preset, nfe: int, weights: tuple[float, ...] = ()) -> float:
        """Seconds from the end of training to the end of the job: without guidance ``weights``, generating
        ``num_eval`` images and their FID; with them, the FID of each weight in memory (w = 1 without the guide's
        calls), then a 64-image guided grid."""
        n = p.num_eval
        if not weights:
            return self.sampling(n, nfe, False) + n * self.inception + 2 * STARTUP_SECONDS + DASHBOARD_SECONDS
        measured = sum(self.sampling(n, nfe, w != 1) + n * self.inception for w in weights)
        return measured + self.sampling(64, nfe, True) + 2 * STARTUP_SECONDS + DASHBOARD_SECONDS


def training_minutes(budget_minutes: float, elapsed_seconds: float, evaluation_seconds: float,
                     margin: float = 1.15, starts: int = 1) -> float:
    """Minutes left to train: the budget less what has run and the evaluation predicted (times ``margin``, since on
    a shared machine the same call's time varies within seconds), less ``starts`` CLI starts."""
    return (budget_minutes * 60 - elapsed_seconds - margin * evaluation_seconds - starts * STARTUP_SECONDS) / 60


def build_untrained(train_options: Options, data: str, device):
    """The network train.py would build for ``train_options`` on ``data``, in eval mode."""
    import dnnlib
    import train
    from training.data.dataset import ImageFolderDataset
    from training.loop.setup import build_network

    ctx = train.main.make_context("train.py", ["--outdir=unused", f"--data={data}", *render(train_options)])
    opts = train.resolve_defaults(dnnlib.EasyDict(ctx.params))
    dataset = ImageFolderDataset(data, use_labels=opts.cond)
    return build_network(train.network_config(opts), dataset, device).eval().requires_grad_(False)


def seconds_per_call(fn, repeats: int = 5) -> float:
    """The median of ``repeats`` timed calls, after one untimed warm-up: what a long stage will see on average
    (the fastest call would catch a quiet moment of a shared machine and predict too little)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_costs(p: Preset, data: str, device: str | None, guide_options: Options | None = None,
                  batch: int | None = None) -> Costs:
    """Per-image seconds of the preset's network (and guide), untrained but the same size, and of the detector,
    on a batch of ``batch`` (default: the preset's generation batch, since a small batch costs more per image),
    in the precision and with the process settings generate.py and fid.py will use."""
    import torch

    from metrics.detector import load_detector
    from torch_utils import distributed as dist
    from training.perf import apply_process_settings, default_fast_paths, prepare_network
    dev = torch.device(device) if device else dist.pick_device()
    batch = batch or p.batch
    precision = p.sampler_options.get("precision")  # None: the network's own, as in generate.py.
    # The stages' own process settings: on a CPU, freed memory kept for reuse spares the page faults of re-allocated
    # activations, which a probe without it would count.
    apply_process_settings(default_fast_paths(dev))

    def network_seconds(options: Options) -> float:
        net = build_untrained(options, data, dev)  # Prepared as generation.prepare_for_sampling does:
        net = prepare_network(net, default_fast_paths(dev, net).with_options(precision=precision),
                              precision=precision is not None)
        x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=dev)
        sigma = torch.full([batch], 2.0, device=dev)
        labels = torch.eye(net.label_dim, device=dev)[torch.arange(batch) % net.label_dim] if net.label_dim else None
        with torch.no_grad():
            return seconds_per_call(lambda: net(x, sigma, labels)) / batch

    detector = load_detector(device=dev)
    images = torch.randint(0, 256, [batch, 1, p.resolution, p.resolution], dtype=torch.uint8, device=dev)
    with torch.no_grad():
        inception = seconds_per_call(lambda: detector(images), repeats=1) / batch
    guide = network_seconds(guide_options) if guide_options is not None else 0.0
    return Costs(net=network_seconds(p.train_options), inception=inception, guide=guide)


def pick_preset(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def fid_value(last_line: str) -> float:
    """fid.py prints the FID alone on its last line."""
    try:
        return float(last_line.split()[-1])
    except (ValueError, IndexError):
        raise click.ClickException(f"fid.py did not end with a FID value (last line: {last_line!r})") from None


def trained_kimg(run_dir: str) -> float:
    """Thousands of images the run trained on: the last ``Progress/kimg`` of its stats.jsonl."""
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])["Progress/kimg"]["mean"]


def snapshot_kimg(path: str) -> float:
    """Thousands of images a snapshot had trained on, from its name."""
    from training.run_files import labelled_nimg
    return labelled_nimg(path) / 1000


def newest_snapshot(run_dir: str) -> str:
    """The run's snapshot of its traditional EMA that is furthest into training."""
    from training.run_files import newest_snapshot as newest

    path = newest(run_dir)
    if path is None:
        raise click.ClickException(f"expected a network snapshot in {run_dir}, found none")
    return path


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One train.py run of the job: into ``outdir`` ('training' or 'guide'), with ``options``; ``guide`` marks the
    run whose last snapshot guides the samples."""
    title: str
    outdir: str
    options: Options
    guide: bool = False


def training_runs(p: Preset, autoguidance: bool, minutes: float | None, network: str) -> list[TrainingRun]:
    """The job's train.py runs, in order. With ``minutes`` (what the budget leaves) they share the time by
    ``--max-minutes``; without, the preset's ``--duration``. Autoguidance adds a 'smaller' guide's own run
    (``guide_share`` of the time or duration), or splits the main run at ``guide_share`` for an 'earlier' guide: the
    first part's snapshot guides, and the second resumes from its state (train.py's exact resume)."""
    def part(options: Options, share: float) -> Options:
        if minutes is not None:
            return {**options, "max-minutes": round(minutes * share, 2)}
        return {**options, "duration": options["duration"] * share}

    whole = p.train_options if minutes is None else part(p.train_options, 1)
    main = TrainingRun(f"Train {network}", "training", whole)
    if not autoguidance:
        return [main]
    share = p.guide_share
    rest = p.train_options if minutes is None else part(p.train_options, 1 - share)  # The main run after the guide's.
    if p.guide == "smaller":
        guide_options = {**p.train_options, **p.guide_options}
        return [TrainingRun("Train the guide: a smaller network, trained shorter (autoguidance)", "guide",
                            part(guide_options, share), guide=True),
                dataclasses.replace(main, options=rest)]
    if p.guide != "earlier":
        raise click.ClickException(f"guide '{p.guide}': expected 'smaller' or 'earlier'")
    return [TrainingRun(f"Train {network}, the first {share:.0%}: its snapshot then is the guide (autoguidance)",
                        "training", part(p.train_options, share), guide=True),
            TrainingRun("Train on from that state (train.py --resume)", "training", {**rest, "resume": "auto"})]


def network_description(train_options: Options) -> str:
    arch = train_options.get("arch", "ddpmpp")
    if arch == "edm2":
        return "an EDM2 (magnitude-preserving) network with its loss"
    return f"a {ARCH_NAMES.get(arch, arch)} network with EDM preconditioning and loss"


def parse_weights(value: str | None) -> tuple[float, ...] | None:
    """--guidance: the weights whose FID is measured (1: unguided), sorted and without repeats as
    ``dnnlib.util.parse_float_list`` gives them."""
    if value is None:
        return None
    import dnnlib
    try:
        weights = tuple(dnnlib.util.parse_float_list(value))
    except ValueError as e:
        raise click.BadParameter(f"{e} (got '{value}')") from None
    if not any(w != 1 for w in weights):
        raise click.BadParameter(f"give at least one weight other than 1 (got '{value}')")
    return weights


def guidance_results(output: str) -> dict[float, float]:
    """FID per weight from ``fid.py calc --guidance=LIST``'s lines 'guidance W: FID F'."""
    results = {}
    for line in output.splitlines():
        if line.startswith("guidance ") and ": FID " in line:
            weight, fid = line[len("guidance "):].split(": FID ")
            results[float(weight)] = float(fid.split(",")[0])
    if not results:
        raise click.ClickException("fid.py printed no 'guidance W: FID F' lines")
    return results


# ----------------------------------------------------------------------------
# The job: the command line resolved into one plain object, then one function per stage.

@dataclasses.dataclass(frozen=True)
class Job:
    """One run of the quickstart: the preset adapted to the command line and the machine, where its files go, the
    device, whether it autoguides, how train.py starts, the numbered stage runner and when the stages began."""
    preset_name: str
    preset: Preset
    outdir: str
    device: str | None
    autoguidance: bool
    launch: Launch
    stage: Stage
    start: float
    few_step: bool = False

    def path(self, *parts: str) -> str:
        return os.path.join(self.outdir, *parts)

    @property
    def device_args(self) -> list[str]:
        return [f"--device={self.device}"] if self.device else []

    @property
    def sampler_args(self) -> list[str]:
        return [*sampler_args(self.preset), *self.device_args]

    @property
    def nfe(self) -> int:
        return self.preset.sampler_options.get("nfe", 2 * self.preset.steps - 1)


def resolve_job(preset_name: str, outdir: str, device: str | None, kimg: float | None, minutes: float | None,
                autoguidance: bool | None, guidance: tuple[float, ...] | None, guide: str | None,
                few_step: bool = False) -> Job:
    """The job the command line asks for, with its output folder made (refused if it holds an earlier run)."""
    p = adapt_preset(PRESETS[preset_name], kimg, fp32=cuda_lacks_bf16(device) or cpu_lacks_bf16(device),
                     minutes=minutes)
    autoguidance = p.autoguidance if autoguidance is None else autoguidance
    for option, field, value in (("--guidance", "guidance", guidance), ("--guide", "guide", guide)):
        if value is not None and not autoguidance:
            raise click.ClickException(f"{option} goes with autoguidance, which preset {preset_name} leaves off; "
                                       "add --autoguidance")
        if value is not None:
            p = dataclasses.replace(p, **{field: value})
    outdir = os.path.abspath(outdir)
    if os.path.exists(os.path.join(outdir, "summary.json")):
        raise click.ClickException(f"--outdir={outdir} already holds a quickstart run; remove it or pick another")
    os.makedirs(outdir, exist_ok=True)
    stages = (9 if autoguidance else 8) + (2 + len(FEW_STEP_NFES) if few_step else 0)
    stage = Stage(total=stages, log_path=os.path.join(outdir, "commands.txt"))
    return Job(preset_name, p, outdir, device, autoguidance, training_launch(p, on_cpu=runs_on_cpu(device)), stage,
               start=time.time(), few_step=few_step)


def print_header(job: Job) -> None:
    p = job.preset
    click.secho(f"Quickstart, preset '{job.preset_name}': train on {p.train_images} Fashion-MNIST images, "
                f"evaluate FID of {p.num_eval} samples against {p.num_ref} real images"
                + (f", within {p.minutes:g} minutes" if p.minutes else "") + f"; output in {job.outdir}", bold=True)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The job's dataset ZIPs: the training half, the reference images and the floor's real images."""
    train: str
    reference: str
    floor: str


def convert(job: Job) -> Datasets:
    """dataset_tool.py, three times. The floor's real images are held-out ones after the reference's where enough
    are left, else training images; its conversion is quiet, inside the second stage."""
    p = job.preset
    data = Datasets(job.path("train.zip"), job.path("reference.zip"), job.path("held-out.zip"))
    floor_start = HELD_OUT_START + p.num_ref if HELD_OUT_START + p.num_ref + p.num_eval <= NUM_SOURCE_IMAGES else 0
    for path in dataclasses.astuple(data):
        if os.path.exists(path):
            os.remove(path)  # Left by an interrupted run; dataset_tool.py refuses to overwrite.
    command = lambda dest, *args: ["dataset_tool.py", f"--source={SOURCE}", f"--dest={dest}",
                                   f"--resolution={p.resolution}x{p.resolution}", *args]
    job.stage.run("Convert the training half of the embedded data",
                  command(data.train, f"--max-images={p.train_images}"))
    job.stage.run("Convert the held-out reference images and the floor's real images",
                  command(data.reference, f"--first={HELD_OUT_START}", f"--max-images={p.num_ref}"))
    subprocess.run([sys.executable, *command(data.floor, f"--first={floor_start}", f"--max-images={p.num_eval}")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return data


def reference_statistics(job: Job, data: Datasets) -> str:
    """fid.py ref on the reference images; returns the statistics' path."""
    reference = job.path("reference.npz")
    job.stage.run("Reference statistics (Inception features of the reference images; cached for the next run)", [
        "fid.py", "ref", f"--data={data.reference}", f"--dest={reference}", f"--batch={job.preset.batch}",
        *job.device_args])
    return reference


def real_data_floor(job: Job, data: Datasets, reference: str) -> float:
    """The FID of real images outside the reference at the samples' count: how low the samples' FID can go."""
    return fid_value(job.stage.run("Real-data floor: FID of real images outside the reference (cached likewise)", [
        "fid.py", "calc", f"--images={data.floor}", f"--ref={reference}", f"--num={job.preset.num_eval}",
        f"--batch={job.preset.batch}", *job.device_args]))


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the time budget left training (``minutes``; None without a budget: the preset's duration), from the
    measured ``costs`` and the evaluation's ``predicted`` seconds."""
    minutes: float | None = None
    costs: Costs | None = None
    predicted: float | None = None


def time_budget(job: Job, data: Datasets) -> Budget:
    """Training's share of the budget: what is left after the stages so far and the evaluation predicted from the
    measured costs of the preset's network, guide and detector."""
    p = job.preset
    if p.minutes is None:
        return Budget()
    separate_guide = job.autoguidance and p.guide == "smaller"
    costs = measure_costs(p, data.train, job.device, {**p.train_options, **p.guide_options} if separate_guide else None)
    if job.autoguidance and not separate_guide:
        costs = dataclasses.replace(costs, guide=costs.net)  # The guide is the main network, earlier.
    predicted = costs.evaluation(p, job.nfe, p.guidance if job.autoguidance else ())
    elapsed = time.time() - job.start
    left = training_minutes(p.minutes, elapsed, predicted, starts=2 if job.autoguidance else 1)
    if left < 0.5:
        raise click.ClickException(
            f"--minutes={p.minutes:g} leaves {max(left, 0):.1f} minutes to train after the evaluation's "
            f"predicted {predicted / 60:.1f}; give more minutes, or --kimg to train a set length")
    click.echo(f"\nTime budget: {elapsed / 60:.1f} min so far; evaluation predicted at {predicted / 60:.1f} min "
               f"(network {costs.net * 1e3:.1f} ms, Inception {costs.inception * 1e3:.0f} ms per image); "
               f"training gets {left:.1f} min")
    if left < 0.4 * p.minutes:
        click.secho(f"Note: this machine leaves training less than 40% of the {p.minutes:g} minutes, so expect a "
                    f"poor FID; --minutes=N gives it more (later runs also skip the cached reference and floor)",
                    fg="yellow")
    return Budget(left, costs, predicted)


@dataclasses.dataclass(frozen=True)
class Trained:
    """The main network's newest snapshot and its kimg, and the guide's snapshot (None without autoguidance)."""
    snapshot: str
    kimg: float
    guide_snapshot: str | None = None


def train_networks(job: Job, data: Datasets, minutes: float | None) -> Trained:
    """train.py for each of the job's training runs (``minutes``: the budget's share, else the preset's duration)."""
    guide_snapshot = None
    processes = f" ({job.launch.processes} processes)" if job.launch.processes > 1 else ""
    for run in training_runs(job.preset, job.autoguidance, minutes, network_description(job.preset.train_options)):
        job.stage.run(run.title + processes, ["train.py", f"--outdir={job.path(run.outdir)}", "--nosubdir",
                                              f"--data={data.train}", "--workers=0", *render(run.options),
                                              *job.device_args], job.launch)
        if run.guide:
            guide_snapshot = newest_snapshot(job.path(run.outdir))
    return Trained(newest_snapshot(job.path("training")), trained_kimg(job.path("training")), guide_snapshot)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The samples' FID, where the samples and their grid are, and with autoguidance the FID per weight and the
    best weight (the one ``fid`` is of)."""
    fid: float
    samples: str
    grid: str
    fid_by_weight: dict[float, float] = dataclasses.field(default_factory=dict)
    best_weight: float | None = None


def weights_text(weights: tuple[float, ...]) -> str:
    return ",".join(f"{w:g}" for w in weights)


def evaluate(job: Job, trained: Trained, reference: str) -> Evaluation:
    """The samples' FID (at the best guidance weight, with autoguidance) and the sample grid."""
    return evaluate_guided(job, trained, reference) if job.autoguidance else evaluate_unguided(job, trained, reference)


def evaluate_unguided(job: Job, trained: Trained, reference: str) -> Evaluation:
    """generate.py's ``num_eval`` images, with their grid, then their FID."""
    p, n = job.preset, job.preset.num_eval
    samples, grid = job.path("samples"), job.path("samples-grid.png")
    sampler = p.sampler_options.get("sampler")
    title = f"{sampler} sampler, NFE {job.nfe}" if sampler else f"EDM Heun sampler, {p.steps} steps"
    job.stage.run(f"Generate {n} images ({title})", [
        "generate.py", f"--network={trained.snapshot}", f"--outdir={samples}", f"--seeds=0-{n - 1}", f"--grid={grid}",
        *job.sampler_args])
    fid = fid_value(job.stage.run("FID of the generated images", [
        "fid.py", "calc", f"--images={samples}", f"--ref={reference}", f"--num={n}", f"--batch={p.batch}",
        *job.device_args]))
    return Evaluation(fid, samples, grid)


def evaluate_guided(job: Job, trained: Trained, reference: str) -> Evaluation:
    """The FID of ``num_eval`` samples made in memory at each guidance weight (fid.py calc; several weights also plot
    the sweep), then 64 images and their grid at the best weight."""
    p, n = job.preset, job.preset.num_eval
    samples, grid, weights = job.path("samples"), job.path("samples-grid.png"), weights_text(p.guidance)
    networks = [f"--network={trained.snapshot}", f"--gnet={trained.guide_snapshot}"]
    fid_args = ["fid.py", "calc", *networks, f"--guidance={weights}", f"--ref={reference}", f"--num={n}",
                *job.sampler_args]
    unguided_note = " (w = 1: unguided)" if 1.0 in p.guidance else ""
    title = f"FID of {n} samples in memory, autoguided at w = {weights}{unguided_note}"
    if len(p.guidance) > 1:
        plot = f"--plot={job.path('fid-vs-guidance.png')}"
        by_weight = guidance_results(job.stage.run_output(title, [*fid_args, plot]))
    else:
        by_weight = {p.guidance[0]: fid_value(job.stage.run(title, fid_args))}
    best = min(by_weight, key=by_weight.get)
    job.stage.run(f"Generate 64 images autoguided at the best weight, w = {best:g}", [
        "generate.py", *networks, f"--guidance={best:g}", f"--outdir={samples}", "--seeds=0-63", f"--grid={grid}",
        *job.sampler_args])
    return Evaluation(by_weight[best], samples, grid, by_weight, best)


@dataclasses.dataclass(frozen=True)
class FewStep:
    """The consistency model (--few-step): its snapshot, its tuning kimg, its FID at each NFE, the grid of its
    one-step samples, how it was made (``method``, the teacher's guidance weight) and the tuning's minutes."""
    snapshot: str
    kimg: float
    fid_by_nfe: dict[int, float]
    grid: str
    method: str = "ect"
    teacher_guidance: float = 1.0
    minutes: float = 0.0


def few_step_teacher_args(p: Preset, trained: Trained, evaluation: Evaluation | None) -> tuple[list[str], float]:
    """train.py's options that name the teacher, and the guidance weight it is distilled at: ECT tunes the snapshot
    itself (no guidance); distillation follows the teacher as evaluated, autoguided at the best weight if it was."""
    if p.few_step_method == "ect":
        return ["--consistency", f"--transfer={trained.snapshot}"], 1.0
    weight = evaluation.best_weight if evaluation is not None and evaluation.best_weight else 1.0
    guide = [] if trained.guide_snapshot is None or weight == 1 else [
        f"--distill-guide={trained.guide_snapshot}", f"--distill-guidance={weight:g}"]
    return [f"--distill={trained.snapshot}", *guide], weight


def tune_few_step(job: Job, data: Datasets, trained: Trained, reference: str,
                  evaluation: Evaluation | None = None) -> FewStep:
    """train.py --consistency (ECT) or --distill from the trained snapshot for FEW_STEP_SHARE of its images, then its
    FID at each of FEW_STEP_NFES (the consistency sampler, in memory) and a grid of 64 one-step images."""
    p, n = job.preset, job.preset.num_eval
    kimg = trained.kimg * FEW_STEP_SHARE
    options = {**p.train_options, **p.few_step_options, "duration": kimg / 1000, "snap": 1000, "dump": 1000}
    options.pop("max-minutes", None)
    teacher, weight = few_step_teacher_args(p, trained, evaluation)
    how = "ECT" if p.few_step_method == "ect" else "distilled from the teacher" + (
        f" autoguided at w = {weight:g}" if weight != 1 else "")
    start = time.time()
    job.stage.run(f"Tune into a consistency model for {kimg:.3g} kimg ({how})", [
        "train.py", f"--outdir={job.path('few-step')}", "--nosubdir", f"--data={data.train}", "--workers=0",
        *render(options), *teacher, *job.device_args], job.launch)
    minutes = (time.time() - start) / 60
    snapshot = newest_snapshot(job.path("few-step"))
    sampler_options = {k: v for k, v in p.sampler_options.items() if k not in ("sampler", "nfe", "steps-schedule",
                                                                               "S_churn")}
    common = [*render({"batch": p.batch, **sampler_options}), "--sampler=consistency", *job.device_args]
    fids = {}
    for nfe in FEW_STEP_NFES:
        fids[nfe] = fid_value(job.stage.run(f"FID of {n} consistency samples in memory, NFE {nfe}", [
            "fid.py", "calc", f"--network={snapshot}", f"--ref={reference}", f"--num={n}", f"--nfe={nfe}", *common]))
    grid = job.path("few-step-grid.png")
    job.stage.run("Generate 64 one-step images", [
        "generate.py", f"--network={snapshot}", f"--outdir={job.path('few-step-samples')}", "--seeds=0-63",
        f"--grid={grid}", "--nfe=1", *common])
    return FewStep(snapshot, snapshot_kimg(snapshot), fids, grid, p.few_step_method, weight,  # Whole batches: a
                   minutes)  # little past the asked kimg.


def dashboard(job: Job) -> str:
    """plot_run.py on the training run; returns the PNG's path."""
    png = job.path("dashboard.png")
    job.stage.run("Dashboard of the training run (loss, loss by noise level, speed, samples)",
                  ["plot_run.py", job.path("training"), f"--out={png}"])
    return png


def summarize(job: Job, floor: float, budget: Budget, trained: Trained, evaluation: Evaluation, reference: str,
              dashboard_png: str, tuned: FewStep | None = None) -> dict:
    """Write summary.json, everything the job measured and made, and print its lines; returns what it holds."""
    p, total_seconds = job.preset, time.time() - job.start
    summary = dict(preset=job.preset_name, fid=evaluation.fid, real_data_floor=floor, num_eval=p.num_eval,
                   num_ref=p.num_ref, kimg=trained.kimg, total_seconds=round(total_seconds, 1),
                   budget_minutes=p.minutes,
                   predicted_evaluation_seconds=None if budget.predicted is None else round(budget.predicted, 1),
                   costs=None if budget.costs is None else dataclasses.asdict(budget.costs),
                   stages={title: round(seconds, 1) for title, seconds in job.stage.timings},
                   snapshot=trained.snapshot, grid=evaluation.grid, samples=evaluation.samples,
                   training_run=job.path("training"), dashboard=dashboard_png, reference=reference)
    if job.autoguidance:
        guided = evaluation.fid_by_weight
        summary.update(guide=p.guide, guide_snapshot=trained.guide_snapshot,
                       guide_kimg=snapshot_kimg(trained.guide_snapshot),
                       fid_by_guidance={f"{w:g}": v for w, v in guided.items()}, best_guidance=evaluation.best_weight,
                       fid_unguided=guided.get(1.0),
                       guidance_plot=job.path("fid-vs-guidance.png") if len(guided) > 1 else None)
    if tuned is not None:
        summary.update(few_step_snapshot=tuned.snapshot, few_step_kimg=tuned.kimg, few_step_grid=tuned.grid,
                       fid_few_step={str(nfe): value for nfe, value in tuned.fid_by_nfe.items()},
                       few_step_method=tuned.method, few_step_teacher_guidance=tuned.teacher_guidance,
                       few_step_minutes=round(tuned.minutes, 2))
    with open(job.path("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(job, summary, total_seconds)
    return summary


def print_summary(job: Job, summary: dict, total_seconds: float) -> None:
    """The summary's lines for the terminal, read from what summary.json holds."""
    n, m, guided = summary["num_eval"], summary["num_ref"], ""
    if job.autoguidance:
        best = summary["best_guidance"]
        best_of = f", the best of {weights_text(job.preset.guidance)}" if len(summary["fid_by_guidance"]) > 1 else ""
        guided = f"; autoguided at w = {best:g}{best_of}; guide {summary['guide_kimg']:.1f} kimg"
    click.secho("\nSummary", bold=True)
    click.echo(f"  samples' FID        {summary['fid']:8.2f}   ({n} generated vs. {m} reference images{guided})")
    if job.autoguidance and summary["fid_unguided"] is not None and summary["best_guidance"] != 1.0:
        click.echo(f"  unguided FID        {summary['fid_unguided']:8.2f}   (the same samples' seeds without the "
                   "guide)")
    for nfe, value in summary.get("fid_few_step", {}).items():
        guided_teacher = summary["few_step_teacher_guidance"] != 1
        made = "consistency-tuned" if summary["few_step_method"] == "ect" else \
            f"distilled from the {'autoguided ' if guided_teacher else ''}teacher"
        click.echo(f"  few-step FID        {value:8.2f}   ({made}, {summary['few_step_kimg']:.3g} kimg in "
                   f"{summary['few_step_minutes']:.1f} min, NFE {nfe}; the teacher above: NFE {job.nfe})")
    click.echo(f"  real-data floor     {summary['real_data_floor']:8.2f}   ({n} other real vs. the same {m} reference "
               f"images)")
    click.echo(f"  training            {summary['kimg']:8.1f}   kimg")
    click.echo(f"  sample grid         {summary['grid']}")
    if "few_step_grid" in summary:
        click.echo(f"  one-step grid       {summary['few_step_grid']}")
    click.echo(f"  network snapshot    {summary['snapshot']}")
    click.echo(f"  training log/stats  {summary['training_run']}")
    click.echo(f"  training dashboard  {summary['dashboard']}")
    click.echo(f"  all numbers         {job.path('summary.json')}")
    budget = f" (budget {job.preset.minutes:g} min)" if job.preset.minutes else ""
    click.echo(f"Finished in {total_seconds / 60:.1f} min{budget}.")


@click.command()
@click.option("--outdir", default="quickstart-out", show_default=True, metavar="DIR",
              help="Where everything goes (must not hold an earlier quickstart run)")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default="auto", show_default=True,
              help="Job size: cpu (15 min on 2 cores), gpu (4 min on an H200; bf16 from Ampere on), smoke (a minute "
              "or two; for CI)")
@click.option("--device", default=None, metavar="DEV", help="Passed to every stage, e.g. cpu  [default: auto]")
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True), default=None, metavar="KIMG",
              help="Train for exactly this many thousand images instead of the preset's duration or time budget")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIN",
              help="Wall-clock budget of the whole job: training gets what the other stages are measured and "
              "predicted to leave  [default: the preset's; cpu: 15]")
@click.option("--autoguidance/--no-autoguidance", default=None,
              help="Also make a guide (--guide) and report the FID of autoguided samples at the best of the "
              "--guidance weights  [default: the preset's; on for cpu]")
@click.option("--guidance", metavar="LIST", default=None, callback=lambda ctx, param, value: parse_weights(value),
              help="With autoguidance: the weights whose FID is measured, 1 for unguided, e.g. 2 or 1,1.5,2,2.5  "
              "[default: the preset's; cpu: 2.5, gpu: 1,1.5,2,2.5]")
@click.option("--guide", type=click.Choice(["smaller", "earlier"]), default=None,
              help="With autoguidance: a smaller network trained for a share of the time, or the main network's own "
              "snapshot after that share  [default: the preset's; cpu: earlier]")
@click.option("--few-step", "few_step", is_flag=True,
              help="Then tune the network into a consistency model for a third of its images and report its FID at "
              "NFE 1 and 2, with a grid of one-step samples (not part of --minutes)")
def main(outdir: str, preset: str, device: str | None, kimg: float | None, minutes: float | None,
         autoguidance: bool | None, guidance: tuple[float, ...] | None, guide: str | None, few_step: bool) -> None:
    """Train a small EDM model on the embedded Fashion-MNIST and report the FID of its samples."""
    # OpenMP threads that sleep rather than spin while waiting (unless the user chose), here and in every stage, set
    # before torch loads: on a CPU shared with other work, spinning threads hold up the descheduled ones they wait for.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    preset_name = pick_preset(preset)
    check_preset(preset_name, PRESETS[preset_name])
    job = resolve_job(preset_name, outdir, device, kimg, minutes, autoguidance, guidance, guide, few_step)
    print_header(job)
    data = convert(job)
    reference = reference_statistics(job, data)
    floor = real_data_floor(job, data, reference)
    budget = time_budget(job, data)
    trained = train_networks(job, data, budget.minutes)
    evaluation = evaluate(job, trained, reference)
    tuned = tune_few_step(job, data, trained, reference, evaluation) if job.few_step else None
    dashboard_png = dashboard(job)
    summarize(job, floor, budget, trained, evaluation, reference, dashboard_png, tuned)


if __name__ == "__main__":
    main()
