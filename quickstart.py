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
import glob
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


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything the job's size depends on."""
    train_images: int  # The first half of the embedded data (at most 5,000 keeps the second half held out).
    num_eval: int  # Images in the generated set and in the real set of the floor.
    num_ref: int  # Held-out real images in the reference statistics. FID's small-sample bias falls with both counts.
    train_args: tuple[str, ...]  # train.py options beyond the data and output folder.
    steps: int = 18  # EDM Heun steps (NFE = 2 * steps - 1), unless generate_args name a --sampler and its --nfe.
    batch: int = 100  # generate.py and fid.py batch size.
    generate_args: tuple[str, ...] = ()  # generate.py options beyond the network, seeds and steps.
    resolution: int = 32  # 32: padded as the official dataset tool does; 28: the native Fashion-MNIST size.
    minutes: float | None = None  # The whole job's wall-clock budget; training gets what the other stages leave.
    autoguidance: bool = False  # Train a guide too and report the FID of autoguided samples (--autoguidance).
    guide: str = "smaller"  # Autoguidance: 'smaller', a separate run with guide_args; 'earlier', the main network's
    # own snapshot after guide_share of its training (no separate run; the guide's calls cost the main network's).
    guide_args: tuple[str, ...] = ()  # A 'smaller' guide's train.py options that replace train_args'.
    guide_share: float = 0.2  # The guide's part of the training time (or of --kimg): a 'smaller' guide's run, or
    # when an 'earlier' guide's snapshot is taken.
    guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5)  # Autoguidance: the weights measured (1: unguided); the job
    # reports the best of them.
    cpu_processes: int = 1  # train.py processes on a CPU (torchrun, gloo), as many as there are cores up to this: on 2
    # cores, two single-thread processes trained 1.4x faster than one process of two threads.


# cpu measured on a 2-core AMD EPYC, gpu on an NVIDIA H200 (docs/quickstart-notes.md); duration is in Mimg as in
# train.py. The cpu preset samples with UniPC at NFE 15 (FID 120.2 against Heun's 123.1 at NFE 35 on the same network,
# in 60% of the time; docs/samplers.md), leaving its budget's minutes to training, and reports the FID of samples
# autoguided at w = 2.5 by the network's own snapshot after a third of its training
# (docs/quickstart-notes.md#the-cpu-preset; on two 48-kimg EDM2 runs' networks and seeds, w = 2 / 2.5 / 3 / 3.5 measured
# FID 36.7 / 36.1 / 36.8 / 38.8 and 36.7 / 35.3 / 35.6 / 37.8). Its network is EDM2's (with EDM2's loss, P_mean/P_std,
# Adam beta2 and post-hoc EMAs) at a learning rate of 0.04: at 48 kimg, autoguided at w = 3, 36.8 and 35.6 (two seeds)
# against 38.6-42.1 at lr 0.02, 39.4 at 0.03, 40.3 at 0.06, 42.6 at 0.08 and 42.9-45.0 for DDPM++ at lr 1e-3 (recipe
# variants trained on a GPU, then checked on the CPU). It keeps 32 channels down to 14x14 (--cres=1,1,2: 271 MFLOP per
# image against 461 for 1,2,2, FID 51.5 against 54.3 at equal time for DDPM++) and trains in two single-thread processes
# (1.4x faster than two threads in one). It makes no sample grids while training (10 s each there); the job's grid is
# generate.py's. Its samples' classes are balanced (seed mod 10: FID 35.3 / 34.9 against 36.1 / 35.3 with random
# classes, on two 48-kimg networks; 39.1 against 39.7 on an end-to-end run's). Its --duration is only a cap: on a 2-core
# CPU with bf16 the budget trained 152-156 kimg (FID 28.8-28.9), past the 100 the cap was before.
PRESETS = {
    "cpu": Preset(train_images=5000, num_eval=1000, num_ref=1000, train_args=(
        "--arch=edm2", "--cond=1", "--cbase=32", "--cres=1,1,2", "--blocks=1", "--attn=",
        "--batch=32", "--lr=0.04", "--lr-decay=500", "--lr-rampup=1", "--ema=0.5", "--ema-rampup=0.1", "--dropout=0",
        "--augment=0", "--bf16=1", "--duration=0.3", "--tick=5", "--snap=1000", "--dump=1000", "--grid=0",
        "--seed=0"), generate_args=("--precision=bf16", "--sampler=unipc_bh2", "--nfe=15",
                                    "--steps-schedule=loguniform", "--class=balanced"), resolution=28, minutes=15,
        autoguidance=True, guidance=(2.5,), guide="earlier", guide_share=1 / 3,
        guide_args=("--cbase=16", "--seed=1"), cpu_processes=2),
    "gpu": Preset(train_images=5000, num_eval=5000, num_ref=5000, batch=500, train_args=(
        "--arch=ddpmpp", "--precond=edm", "--cbase=128", "--cres=1,2,2", "--blocks=2", "--attn=16",
        "--batch=256", "--lr=1e-3", "--lr-rampup=10", "--ema=0.5", "--ema-rampup=0.1", "--dropout=0.1",
        "--augment=0", "--bf16=1", "--duration=0.3", "--tick=50", "--snap=1000", "--dump=1000", "--grid=64",
        "--seed=0"), generate_args=("--precision=bf16", "--S_churn=40"), guide_args=("--cbase=64", "--seed=1")),
    "smoke": Preset(train_images=256, num_eval=16, num_ref=32, steps=4, batch=16, resolution=28, train_args=(
        "--arch=ddpmpp", "--precond=edm", "--cond=1", "--cbase=8", "--cres=1,1", "--blocks=1", "--attn=16",
        "--batch=16", "--lr=1e-3", "--lr-rampup=0", "--ema=0.001", "--dropout=0", "--augment=0",
        "--duration=0.000064", "--tick=0.032", "--snap=1000", "--dump=1000", "--grid=16", "--seed=0"),
        guide_share=0.5, guidance=(1.0, 2.0), guide_args=("--seed=1",)),
}


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
    if processes <= 1 or int(option_value(p.train_args, "batch", "512")) % processes:
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


BF16_ARGS = ("--bf16=1", "--precision=bf16")
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
    """Whether the stages will run on a CPU without bfloat16 instructions (AVX-512 BF16 or AMX): there PyTorch
    emulates bf16, about 30x slower than fp32 (measured on an AMD EPYC without AVX-512). Unknown (not Linux): True."""
    if not runs_on_cpu(device):
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not {"avx512_bf16", "amx_bf16"} & set(flags)


def adapt_preset(p: Preset, kimg: float | None, fp32: bool, minutes: float | None = None) -> Preset:
    """The preset with its training duration replaced by exactly ``kimg`` (if given; no time budget then), its
    budget by ``minutes`` (if given) and, with ``fp32``, its bf16 options dropped."""
    train_args = tuple(a for a in p.train_args if not (fp32 and a in BF16_ARGS))
    if kimg is not None:
        train_args = with_options(train_args, f"--duration={kimg / 1000:g}")
    generate_args = tuple(a for a in p.generate_args if not (fp32 and a in BF16_ARGS))
    budget = None if kimg is not None else minutes if minutes is not None else p.minutes
    return dataclasses.replace(p, train_args=train_args, generate_args=generate_args, minutes=budget)


def with_options(args: tuple[str, ...], *replacements: str) -> tuple[str, ...]:
    """``args`` with each ``--name=value`` of ``replacements`` replacing the option of that name (or added)."""
    names = {r.split("=", 1)[0] for r in replacements}
    return tuple(a for a in args if a.split("=", 1)[0] not in names) + replacements


def option_value(args: tuple[str, ...], name: str, default: str | None = None) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), default)


# ----------------------------------------------------------------------------
# The time budget: training gets what the evaluation will leave, predicted from measured per-image costs.

STARTUP_SECONDS = 8  # Each CLI's start (imports, loading the network or the detector), measured 3-6 s.
DASHBOARD_SECONDS = 3  # plot_run.py, start included: 1.2-2.6 s in twelve runs of the cpu preset.


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
    """Minutes left to train: the budget less what has run and the evaluation predicted (times ``margin``: on the
    shared 2-core machine the same call's time varied by 1.4x within seconds), less ``starts`` CLI starts."""
    return (budget_minutes * 60 - elapsed_seconds - margin * evaluation_seconds - starts * STARTUP_SECONDS) / 60


def build_untrained(train_args: tuple[str, ...], data: str, device):
    """The network train.py would build for ``train_args`` on ``data``, in eval mode."""
    import dnnlib
    import train
    from training.dataset import ImageFolderDataset
    from training.training_loop import build_network

    ctx = train.main.make_context("train.py", ["--outdir=unused", f"--data={data}", *train_args])
    opts = train.resolve_defaults(dnnlib.EasyDict(ctx.params))
    dataset = ImageFolderDataset(data, use_labels=opts.cond)
    return build_network(train.network_config(opts), dataset, device).eval().requires_grad_(False)


def seconds_per_call(fn, repeats: int = 5) -> float:
    """The median of ``repeats`` timed calls, after one untimed warm-up: what a long stage will see on average
    (the fastest call predicted the guided sampling 1.3x too fast on a shared machine)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_costs(p: Preset, data: str, device: str | None, guide_args: tuple[str, ...] | None = None,
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
    precision = option_value(p.generate_args, "precision")  # None: the network's own, as in generate.py.
    # The stages' own process settings: on a CPU, freed memory kept for reuse made the probed network call 1.15x
    # and an Inception pass 1.4x faster (no page faults on re-allocated activations).
    apply_process_settings(default_fast_paths(dev))

    def network_seconds(args: tuple[str, ...]) -> float:
        net = build_untrained(args, data, dev)  # Prepared as generation.prepare_for_sampling does:
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
    guide = network_seconds(guide_args) if guide_args is not None else 0.0
    return Costs(net=network_seconds(p.train_args), inception=inception, guide=guide)


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
    from training.training_state import labelled_nimg
    return labelled_nimg(path) / 1000


def newest(pattern: str) -> str:
    """The file matching ``pattern`` that is furthest into training (by its kimg label)."""
    from training.training_state import labelled_nimg

    paths = [path for path in glob.glob(pattern) if labelled_nimg(path) is not None]
    if not paths:
        raise click.ClickException(f"expected a file matching {pattern}, found none")
    return max(paths, key=labelled_nimg)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One train.py run of the job: into ``outdir`` ('training' or 'guide'), with ``args``; ``guide`` marks the run
    whose last snapshot guides the samples."""
    title: str
    outdir: str
    args: tuple[str, ...]
    guide: bool = False


def training_runs(p: Preset, autoguidance: bool, minutes: float | None, network: str) -> list[TrainingRun]:
    """The job's train.py runs, in order. With ``minutes`` (what the budget leaves) they share the time by
    ``--max-minutes``; without, the preset's ``--duration``. Autoguidance adds a 'smaller' guide's own run
    (``guide_share`` of the time or duration), or splits the main run at ``guide_share`` for an 'earlier' guide: the
    first part's snapshot guides, and the second resumes from its state (train.py's exact resume)."""
    def part(args: tuple[str, ...], share: float) -> tuple[str, ...]:
        if minutes is not None:
            return with_options(args, f"--max-minutes={minutes * share:.2f}")
        return with_options(args, f"--duration={float(option_value(args, 'duration')) * share:g}")

    main = TrainingRun(f"Train {network}", "training", p.train_args if minutes is None else part(p.train_args, 1))
    if not autoguidance:
        return [main]
    share = p.guide_share
    if p.guide == "smaller":
        guide_args = with_options(p.train_args, *p.guide_args)
        return [TrainingRun("Train the guide: a smaller network, trained shorter (autoguidance)", "guide",
                            part(guide_args, share), guide=True),
                dataclasses.replace(main, args=main.args if minutes is None else part(p.train_args, 1 - share))]
    if p.guide != "earlier":
        raise click.ClickException(f"guide '{p.guide}': expected 'smaller' or 'earlier'")
    rest = p.train_args if minutes is None else part(p.train_args, 1 - share)
    return [TrainingRun(f"Train {network}, the first {share:.0%}: its snapshot then is the guide (autoguidance)",
                        "training", part(p.train_args, share), guide=True),
            TrainingRun("Train on from that state (train.py --resume)", "training",
                        with_options(rest, "--resume=auto"))]


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
def main(outdir: str, preset: str, device: str | None, kimg: float | None, minutes: float | None,
         autoguidance: bool | None, guidance: tuple[float, ...] | None, guide: str | None) -> None:
    """Train a small EDM model on the embedded Fashion-MNIST and report the FID of its samples."""
    # OpenMP threads that sleep rather than spin while waiting (unless the user chose), here and in every stage,
    # set before torch loads: on a CPU shared with other work, spinning made a network call 12x slower (a batch of
    # 25 took 4.8 s against 0.39 s on 2 busy cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    preset_name = pick_preset(preset)
    p = adapt_preset(PRESETS[preset_name], kimg, fp32=cuda_lacks_bf16(device) or cpu_lacks_bf16(device),
                     minutes=minutes)
    autoguidance = p.autoguidance if autoguidance is None else autoguidance
    if guidance is not None:
        if not autoguidance:
            raise click.ClickException(f"--guidance goes with autoguidance, which preset {preset_name} leaves off; "
                                       "add --autoguidance")
        p = dataclasses.replace(p, guidance=guidance)
    if guide is not None:
        if not autoguidance:
            raise click.ClickException(f"--guide goes with autoguidance, which preset {preset_name} leaves off; "
                                       "add --autoguidance")
        p = dataclasses.replace(p, guide=guide)
    outdir = os.path.abspath(outdir)
    if os.path.exists(os.path.join(outdir, "summary.json")):
        raise click.ClickException(f"--outdir={outdir} already holds a quickstart run; remove it or pick another")
    os.makedirs(outdir, exist_ok=True)
    path = lambda *parts: os.path.join(outdir, *parts)
    device_args = [f"--device={device}"] if device else []
    launch = training_launch(p, on_cpu=runs_on_cpu(device))
    n, m = p.num_eval, p.num_ref
    nfe = int(option_value(p.generate_args, "nfe", str(2 * p.steps - 1)))
    sampler_name = option_value(p.generate_args, "sampler")
    sampler_title = f"{sampler_name} sampler, NFE {nfe}" if sampler_name else f"EDM Heun sampler, {p.steps} steps"
    held_out_start = NUM_SOURCE_IMAGES // 2
    convert = lambda dest, *args: ["dataset_tool.py", f"--source={SOURCE}", f"--dest={path(dest)}",
                                   f"--resolution={p.resolution}x{p.resolution}", *args]
    if max(p.train_images, n, m) > held_out_start:
        raise click.ClickException(f"preset {preset_name}: train_images, num_eval and num_ref must be at most "
                                   f"{held_out_start}")
    # The floor's real images: held-out ones after the reference's where enough are left, else training images.
    floor_start = held_out_start + m if held_out_start + m + n <= NUM_SOURCE_IMAGES else 0
    separate_guide = autoguidance and p.guide == "smaller"
    click.secho(f"Quickstart, preset '{preset_name}': train on {p.train_images} Fashion-MNIST images, "
                f"evaluate FID of {n} samples against {m} real images"
                + (f", within {p.minutes:g} minutes" if p.minutes else "") + f"; output in {outdir}", bold=True)
    start = time.time()
    stage = Stage(total=9 if autoguidance else 8, log_path=path("commands.txt"))

    for name in ("train.zip", "reference.zip", "held-out.zip"):
        if os.path.exists(path(name)):
            os.remove(path(name))  # Left by an interrupted run; dataset_tool.py refuses to overwrite.
    stage.run("Convert the training half of the embedded data",
              convert("train.zip", f"--max-images={p.train_images}"))
    stage.run("Convert the held-out reference images and the floor's real images",
              convert("reference.zip", f"--first={held_out_start}", f"--max-images={m}"))
    subprocess.run([sys.executable, *convert("held-out.zip", f"--first={floor_start}", f"--max-images={n}")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    stage.run("Reference statistics (Inception features of the reference images; cached for the next run)", [
        "fid.py", "ref", f"--data={path('reference.zip')}", f"--dest={path('reference.npz')}",
        f"--batch={p.batch}", *device_args])
    floor = fid_value(stage.run("Real-data floor: FID of real images outside the reference (cached likewise)", [
        "fid.py", "calc", f"--images={path('held-out.zip')}", f"--ref={path('reference.npz')}", f"--num={n}",
        f"--batch={p.batch}", *device_args]))

    left, costs, predicted = None, None, None
    if p.minutes is not None:
        costs = measure_costs(p, path("train.zip"), device,
                              with_options(p.train_args, *p.guide_args) if separate_guide else None)
        if autoguidance and not separate_guide:
            costs = dataclasses.replace(costs, guide=costs.net)  # The guide is the main network, earlier.
        predicted = costs.evaluation(p, nfe, p.guidance if autoguidance else ())
        left = training_minutes(p.minutes, time.time() - start, predicted, starts=2 if autoguidance else 1)
        if left < 0.5:
            raise click.ClickException(
                f"--minutes={p.minutes:g} leaves {max(left, 0):.1f} minutes to train after the evaluation's "
                f"predicted {predicted / 60:.1f}; give more minutes, or --kimg to train a set length")
        click.echo(f"\nTime budget: {(time.time() - start) / 60:.1f} min so far; evaluation predicted at "
                   f"{predicted / 60:.1f} min (network {costs.net * 1e3:.1f} ms, Inception "
                   f"{costs.inception * 1e3:.0f} ms per image); training gets {left:.1f} min")
        if left < 0.4 * p.minutes:
            click.secho(f"Note: this machine leaves training less than 40% of the {p.minutes:g} minutes, so expect a "
                        f"poor FID; --minutes=N gives it more (later runs also skip the cached reference and floor)",
                        fg="yellow")

    arch = option_value(p.train_args, "arch", "ddpmpp")
    network = "an EDM2 (magnitude-preserving) network with its loss" if arch == "edm2" else \
        f"a {ARCH_NAMES.get(arch, arch)} network with EDM preconditioning and loss"
    guide_snapshot = None
    processes = f" ({launch.processes} processes)" if launch.processes > 1 else ""
    for run in training_runs(p, autoguidance, left, network):
        stage.run(run.title + processes, ["train.py", f"--outdir={path(run.outdir)}", "--nosubdir",
                                          f"--data={path('train.zip')}", "--workers=0", *run.args, *device_args],
                  launch)
        if run.guide:
            guide_snapshot = newest(path(run.outdir, "network-snapshot-*.pkl"))
    snapshot = newest(path("training", "network-snapshot-*.pkl"))
    kimg_done = trained_kimg(path("training"))
    sampler_args = [f"--steps={p.steps}", f"--batch={p.batch}", *p.generate_args, *device_args]
    guided = {}
    if autoguidance:
        weights = ",".join(f"{w:g}" for w in p.guidance)
        fid_args = ["fid.py", "calc", f"--network={snapshot}", f"--gnet={guide_snapshot}", f"--guidance={weights}",
                    f"--ref={path('reference.npz')}", f"--num={n}", *sampler_args]
        unguided_note = " (w = 1: unguided)" if 1.0 in p.guidance else ""
        title = f"FID of {n} samples in memory, autoguided at w = {weights}{unguided_note}"
        if len(p.guidance) > 1:
            guided = guidance_results(stage.run_output(title, [*fid_args, f"--plot={path('fid-vs-guidance.png')}"]))
        else:
            guided = {p.guidance[0]: fid_value(stage.run(title, fid_args))}
        best = min(guided, key=guided.get)
        fid = guided[best]
        stage.run(f"Generate 64 images autoguided at the best weight, w = {best:g}", [
            "generate.py", f"--network={snapshot}", f"--gnet={guide_snapshot}", f"--guidance={best:g}",
            f"--outdir={path('samples')}", "--seeds=0-63", f"--grid={path('samples-grid.png')}", *sampler_args])
    else:
        stage.run(f"Generate {n} images ({sampler_title})", [
            "generate.py", f"--network={snapshot}", f"--outdir={path('samples')}", f"--seeds=0-{n - 1}",
            f"--grid={path('samples-grid.png')}", *sampler_args])
        fid = fid_value(stage.run("FID of the generated images", [
            "fid.py", "calc", f"--images={path('samples')}", f"--ref={path('reference.npz')}", f"--num={n}",
            f"--batch={p.batch}", *device_args]))
    stage.run("Dashboard of the training run (loss, loss by noise level, speed, samples)",
              ["plot_run.py", path("training"), f"--out={path('dashboard.png')}"])

    total = time.time() - start
    summary = dict(preset=preset_name, fid=fid, real_data_floor=floor, num_eval=n, num_ref=m, kimg=kimg_done,
                   total_seconds=round(total, 1), budget_minutes=p.minutes,
                   predicted_evaluation_seconds=None if predicted is None else round(predicted, 1),
                   costs=None if costs is None else dataclasses.asdict(costs),
                   stages={title: round(seconds, 1) for title, seconds in stage.timings},
                   snapshot=snapshot, grid=path("samples-grid.png"), samples=path("samples"),
                   training_run=path("training"), dashboard=path("dashboard.png"), reference=path("reference.npz"))
    if autoguidance:
        summary.update(guide=p.guide, guide_snapshot=guide_snapshot, guide_kimg=snapshot_kimg(guide_snapshot),
                       fid_by_guidance={f"{w:g}": v for w, v in guided.items()}, best_guidance=best,
                       fid_unguided=guided.get(1.0),
                       guidance_plot=path("fid-vs-guidance.png") if len(guided) > 1 else None)
    with open(path("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    best_of = f", the best of {weights}" if len(guided) > 1 else ""
    click.secho("\nSummary", bold=True)
    click.echo(f"  samples' FID        {fid:8.2f}   ({n} generated vs. {m} reference images"
               + (f"; autoguided at w = {best:g}{best_of}; guide {summary['guide_kimg']:.1f} kimg)" if autoguidance
                  else ")"))
    if autoguidance and 1.0 in guided and best != 1.0:
        click.echo(f"  unguided FID        {guided[1.0]:8.2f}   (the same samples' seeds without the guide)")
    click.echo(f"  real-data floor     {floor:8.2f}   ({n} other real vs. the same {m} reference images)")
    click.echo(f"  training            {kimg_done:8.1f}   kimg")
    click.echo(f"  sample grid         {summary['grid']}")
    click.echo(f"  network snapshot    {snapshot}")
    click.echo(f"  training log/stats  {path('training')}")
    click.echo(f"  training dashboard  {path('dashboard.png')}")
    click.echo(f"  all numbers         {path('summary.json')}")
    budget = f" (budget {p.minutes:g} min)" if p.minutes else ""
    click.echo(f"Finished in {total / 60:.1f} min{budget}.")


if __name__ == "__main__":
    main()
