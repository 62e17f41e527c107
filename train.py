"""Train a diffusion model with the techniques of "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM). A thin command line over training.training_loop.training_loop; see README.md, section Training."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import zipfile

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from dnnlib.util import atomic_write_bytes
from training.checkpoint import load_network_pkl
from training.cli_options import parse_levels
from training.data.encoders import DEFAULT_VAE
from training.perf import check_precision
from training.loop.config import TrainingConfigError, check_network_fits_dataset
from training.loop.setup import data_loader_kwargs
from training.loop.training_loop import training_loop
from training.loop.state import StateFileError, read_state_file
from training.run_files import labelled_nimg, newest_state_file
from training.presets import (ARCHITECTURES, CONSISTENCY_DEFAULTS, CONSISTENCY_LOSS, CT_RECIPES, CT_STAGES,
                              EDM2_DEFAULTS, EDM2_LOSS, EDM2_NETWORK, EDM_DEFAULTS, LATENT_PRESETS, OPTIMIZERS,
                              PRECONDITIONERS, PRESETS)
from training.sampling.time_steps import DEFAULT_NUM_STEPS



def resolve_defaults(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """The options with --ct-recipe, --preset and the architecture's defaults filled in where not given on the command
    line (given options always win); --consistency draws t from ECT's p(t) unless --p-mean/--p-std say otherwise."""
    opts = dnnlib.EasyDict(opts)
    if opts.get("ct_recipe"):
        for key, value in CT_RECIPES[opts.ct_recipe].items():
            if opts.get(key) is None or (key == "consistency" and not opts.get(key)):
                opts[key] = value
    if opts.get("distill"):
        opts.consistency = True
        if opts.get("transfer") is None and opts.get("resume") is None:
            opts.transfer = opts.distill  # The student starts as the teacher.
    if opts.get("consistency"):
        for key, value in CONSISTENCY_DEFAULTS.items():
            if opts.get(key) is None:
                opts[key] = value
    if opts.get("preset"):
        for key, value in PRESETS[opts.preset].items():
            if opts.get(key) is None:
                opts[key] = value
    if opts.get("cond") is None:
        opts.cond = bool(opts.get("preset"))  # train_edm2.py trains class-conditional by default; EDM's train.py not.
    if opts.get("fp16") is None and not opts.get("preset"):
        opts.fp16 = False  # With a preset, resolve_fp16 decides once the device is known.
    if opts.get("arch") is None:
        opts.arch = "ddpmpp"
    defaults = EDM2_DEFAULTS if opts.arch == "edm2" else EDM_DEFAULTS
    for key, value in defaults.items():
        if opts.get(key) is None:
            opts[key] = value
    return opts


def resolve_fp16(opts: dnnlib.EasyDict, device: torch.device) -> str | None:
    """--fp16 where not given: off, as EDM's train.py, except under --preset, whose official script (train_edm2.py)
    trains in fp16 by default: on then, where the device runs fp16 (CUDA). Elsewhere such a run stays in float32, and
    the note returned says so (None when there is nothing to say)."""
    if opts.get("fp16") is not None:
        return None
    wanted = bool(opts.get("preset")) and not opts.get("bf16")
    opts.fp16 = wanted and device.type == "cuda"
    if wanted and not opts.fp16:
        return (f"--preset={opts.preset} trains in fp16 as train_edm2.py does, which runs on CUDA only: this run on "
                f"{device.type} is float32 (--bf16=1 for mixed precision here, --fp16=0 to say float32)")
    return None


def check_edm2_options(opts: dnnlib.EasyDict) -> None:
    """What EDM2's network cannot do, and what only it can (--patch), as one line each."""
    if opts.arch != "edm2":
        if opts.patch is not None and opts.patch > 1:
            raise click.ClickException(f"--patch={opts.patch}: patches are an option of --arch=edm2's U-Net only")
        if opts.get("dropout_res") is not None:
            raise click.ClickException(f"--dropout-res={opts.dropout_res}: an option of --arch=edm2's U-Net only")
        return
    if opts.precond != "edm":
        raise click.ClickException(f"--precond={opts.precond}: --arch=edm2 has its own preconditioning (EDM's Table 1 "
                                   f"column with sigma_data = 0.5); leave --precond at edm")
    if opts.augment:
        raise click.ClickException(f"--augment={opts.augment}: EDM2's network takes no augmentation labels; use "
                                   f"--augment=0 with --arch=edm2")


def refuse_options_without(opts: dnnlib.EasyDict, names: tuple[str, ...], owner: str) -> None:
    """One line naming the options of ``names`` that were given without the option ``owner`` they belong to."""
    given = [f"--{name.replace('_', '-')}" for name in names if opts.get(name) is not None]
    if given:
        raise click.ClickException(f"{', '.join(given)}: options of {owner}")


def check_distill_options(opts: dnnlib.EasyDict) -> None:
    """--distill's options go with it; a guidance weight with a guide; the teacher and guide files are readable."""
    if not opts.get("distill"):
        refuse_options_without(opts, DISTILL_OPTIONS, "--distill=TEACHER")
        return
    if (opts.get("distill_guidance") is not None) != (opts.get("distill_guide") is not None):
        raise click.ClickException("--distill-guide and --distill-guidance go together: a guide and its weight w")
    check_transfer_file(opts.distill, "--distill")
    if opts.get("distill_guide") not in (None, "uncond"):
        check_transfer_file(opts.distill_guide, "--distill-guide")


def check_latent_options(opts: dnnlib.EasyDict, dataset_obj) -> None:
    """A dataset of latents (dataset_tool.py encode) goes with the latent presets, without augmentation, and with an
    image reference for its metrics; the latent presets need one."""
    if opts.preset in LATENT_PRESETS and not dataset_obj.is_latent:
        raise click.ClickException(f"--preset={opts.preset} trains on latents of Stability's VAE, but --data="
                                   f"{opts.data} holds images; make the latents with dataset_tool.py encode")
    if dataset_obj.is_latent and opts.augment:
        raise click.ClickException(f"--augment={opts.augment}: --data={opts.data} holds latents, which the "
                                   f"augmentation pipe (made for pixels) does not apply to; use --augment=0")
    if dataset_obj.is_latent and opts.metrics and not opts.get("metrics_ref"):
        raise click.ClickException(f"--metrics: --data={opts.data} holds latents; give the reference of the images "
                                   f"they were encoded from with --metrics-ref=PKL|NPZ|DIR (fid.py ref)")


# The official augmentation setting (--augment=p): every geometric transform, x-flips always drawn.
AUGMENT_TRANSFORMS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
AUGMENT_DIM = 9
# Options that replace an architecture setting when given: (option, network keyword), in this order.
NETWORK_OVERRIDES = (("cbase", "model_channels"), ("cres", "channel_mult"), ("blocks", "num_blocks"),
                     ("attn", "attn_resolutions"), ("patch", "patch_size"), ("dropout_res", "dropout_res"))
CT_OPTIONS = ("ct_stage", "ct_huber", "ct_q", "ct_k", "ct_b", "ct_weight", "ct_sigmas")  # Those of --consistency.
DISTILL_OPTIONS = ("distill_guide", "distill_guidance", "distill_step")  # Those of --distill.
# The switches of training.perf.FastPaths that train.py exposes.
FAST_PATH_OPTIONS = ("sdpa", "channels_last", "fused_adam", "compile", "tf32", "retain_memory")


def parse_int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return dnnlib.parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def parse_consistency_levels(ctx, param, value):
    """--ct-sigmas: levels in the order given, checked as the consistency sampler will take them."""
    from training.sampling.spec import NamedSampler
    levels = parse_levels(value)
    if levels is not None:
        try:
            NamedSampler("consistency", nfe=max(len(levels) - 1, 1), sigmas=levels)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return None if levels is None else list(levels)


def parse_float_list(ctx, param, value):
    """'0.050,0.100' -> [0.05, 0.1] (``dnnlib.util.parse_float_list``); 'none' -> [] (switch off what a preset
    turned on)."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return []
    try:
        values = dnnlib.util.parse_float_list(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (got '{value}')") from None
    if not values:
        raise click.BadParameter("give at least one number, or 'none'")
    return values


def network_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """network_kwargs: the --precond network with the --arch settings, then the options that override them."""
    class_name = EDM2_NETWORK if opts.arch == "edm2" else PRECONDITIONERS[opts.precond][0]
    config = dnnlib.EasyDict(class_name=class_name, **ARCHITECTURES[opts.arch])
    config.update((keyword, opts[option]) for option, keyword in NETWORK_OVERRIDES if opts[option] is not None)
    if opts.augment:  # The network is told which augmentation each image had.
        config.augment_dim = AUGMENT_DIM
    config.dropout = opts.dropout
    config.use_fp16 = bool(opts.fp16)
    if opts.bf16:
        config.use_bf16 = True
    return config


def augment_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict | None:
    """augment_kwargs for --augment, or None when it is 0 (no augmentation)."""
    if not opts.augment:
        return None
    return dnnlib.EasyDict(class_name="training.augment.AugmentPipe", p=opts.augment, **AUGMENT_TRANSFORMS)


def build_config(opts: dnnlib.EasyDict, dataset_obj) -> dnnlib.EasyDict:
    """The training_loop() keyword arguments for these command-line options."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache,
                                       resolution=dataset_obj.resolution, max_size=len(dataset_obj))
    c.data_loader_kwargs = dnnlib.EasyDict(data_loader_kwargs(dist.get_device(), opts.workers))
    c.network_kwargs = network_config(opts)
    c.loss_kwargs = loss_config(opts)
    c.optimizer_kwargs = dnnlib.EasyDict(class_name=OPTIMIZERS[opts.optimizer], lr=opts.lr,
                                         betas=[0.9, opts.adam_beta2], eps=1e-8)
    augment = augment_config(opts)
    if augment is not None:
        c.augment_kwargs = augment
    if dataset_obj.is_latent:
        c.encoder_kwargs = dnnlib.EasyDict(class_name="training.encoders.StabilityVAEEncoder", vae_name=opts.vae)

    c.total_kimg = opts.duration * 1000
    if opts.max_minutes is not None:
        c.max_minutes = opts.max_minutes
    c.ema_halflife_kimg = opts.ema * 1000
    c.ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    c.lr_rampup_kimg = opts.lr_rampup
    if opts.lr_decay:
        c.lr_decay_batches = opts.lr_decay
    if opts.lr_cooldown:
        c.lr_cooldown = opts.lr_cooldown
    if opts.ema_std:
        c.ema_stds = list(opts.ema_std)
    if opts.label_dropout:
        c.label_dropout = opts.label_dropout
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.fast_paths = {name: opts[name] for name in FAST_PATH_OPTIONS if opts[name] is not None}
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, grid_images=opts.grid)
    c.seed = opts.seed if opts.seed is not None else shared_random_seed()
    if opts.get("distill"):
        c.teacher_kwargs = dnnlib.EasyDict(teacher=opts.distill)
        if opts.get("distill_guide") is not None:
            c.teacher_kwargs.update(guide=opts.distill_guide, guidance=opts.distill_guidance)
    if opts.transfer is not None:
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    metrics = metrics_config(opts)
    if metrics is not None:
        c.metrics_kwargs = metrics
    return c


def loss_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """loss_kwargs: the --precond column's loss, or EDM2's uncertainty-weighted one; log-normal p_train from
    --p-mean/--p-std where the loss has one (EDM, EDM2). With --consistency: ECT's consistency loss, whatever the
    network and preconditioning."""
    if opts.get("consistency"):
        stage_kimg = opts.ct_stage if opts.get("ct_stage") else opts.duration * 1000 / CT_STAGES
        sigmas = {} if not opts.get("ct_sigmas") else dict(sample_sigmas=list(opts.ct_sigmas))
        return dnnlib.EasyDict(class_name=CONSISTENCY_LOSS, P_mean=opts.p_mean, P_std=opts.p_std, c=opts.ct_huber,
                               q=opts.ct_q, k=opts.ct_k, b=opts.ct_b, weighting=opts.ct_weight, **sigmas,
                               **({} if opts.get("distill_step") is None else dict(teacher_step=opts.distill_step)),
                               stage_nimg=max(1, round(stage_kimg * 1000)))
    refuse_options_without(opts, CT_OPTIONS, "--consistency")
    class_name = EDM2_LOSS if opts.arch == "edm2" else PRECONDITIONERS[opts.precond][1]
    config = dnnlib.EasyDict(class_name=class_name)
    if class_name in (EDM2_LOSS, PRECONDITIONERS["edm"][1]):
        config.update((key, opts[option]) for option, key in (("p_mean", "P_mean"), ("p_std", "P_std"))
                      if opts[option] is not None)
    elif opts.p_mean is not None or opts.p_std is not None:
        raise click.ClickException(f"--p-mean/--p-std: the {opts.precond.upper()} loss draws sigma from its own "
                                   f"p_train (Table 1); they apply to --precond=edm and --arch=edm2")
    return config


def shared_random_seed() -> int:
    """A random seed drawn on rank 0 and shared with every rank."""
    seed = torch.randint(1 << 31, size=[], device=dist.get_device()) if dist.is_main() else \
        torch.zeros([], dtype=torch.int64, device=dist.get_device())
    return int(dist.all_reduce_sum(seed))


def open_dataset(opts: dnnlib.EasyDict):
    """Open the dataset once to check it and learn its name, resolution and size."""
    from training.data.dataset import ImageFolderDataset
    try:
        dataset_obj = ImageFolderDataset(path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise click.ClickException(f"--data={opts.data}: {e}") from None
    if opts.cond and not dataset_obj.has_labels:
        raise click.ClickException(f"--data={opts.data}: --cond=1 needs class labels in its dataset.json")
    return dataset_obj


def run_description(opts: dnnlib.EasyDict, dataset_name: str) -> str:
    dtype = "fp16" if opts.fp16 else "bf16" if opts.bf16 else "fp32"
    desc = (f"{dataset_name}-{'cond' if opts.cond else 'uncond'}-{opts.arch}-{opts.precond}-"
            f"gpus{dist.get_world_size()}-batch{opts.batch}-{dtype}")
    return f"{desc}-{opts.desc}" if opts.desc else desc


def pick_run_dir(opts: dnnlib.EasyDict, desc: str) -> tuple[str, str | None]:
    """(run directory, state to resume from). ``--resume=auto`` continues the newest run of the same
    description that has a state, in its own directory; otherwise a new ``NNNNN-desc`` directory is made
    (or ``--outdir`` itself with ``--nosubdir``)."""
    outdir = opts.outdir
    runs = []
    if os.path.isdir(outdir) and not opts.nosubdir:
        runs = [name for name in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, name))]
    if opts.resume == "auto":
        candidates = [outdir] if opts.nosubdir else [os.path.join(outdir, name) for name in sorted(runs)
                                                     if re.fullmatch(rf"\d+-{re.escape(desc)}", name)]
        states = [state for state in map(newest_state_file, candidates) if state is not None]
        if states:
            newest = max(states, key=lambda p: (labelled_nimg(p), os.path.getmtime(p)))
            return os.path.dirname(newest), newest
    resume = opts.resume if opts.resume not in (None, "auto") else None
    if opts.nosubdir:
        return outdir, resume
    run_ids = [int(m.group()) for m in (re.match(r"^\d+", name) for name in runs) if m is not None]
    return os.path.join(outdir, f"{max(run_ids, default=-1) + 1:05d}-{desc}"), resume


def prepare_run_dir(run_dir: str, config: dict) -> None:
    """Create the run directory and write training_options.json; one clear error if that is impossible."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(run_dir, "training_options.json"), json.dumps(config, indent=2).encode())
    except OSError as e:
        raise click.ClickException(f"--outdir: cannot write to {run_dir} ({e.strerror or e}); choose a writable "
                                   f"directory") from None


def shared_from_rank0(value):
    """Rank 0's value on every rank."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@click.command()
# Main options.
@click.option("--outdir", help="Folder for the run directories", metavar="DIR", type=str, required=True)
@click.option("--data", help="Training images: a dataset ZIP or folder (dataset_tool.py)",
              metavar="ZIP|DIR", type=str, required=True)
@click.option("--cond", help="Condition on the dataset's class labels  [default: 0; 1 with --preset, as "
              "train_edm2.py]", metavar="BOOL", type=bool)
@click.option("--arch", help="U-Net: DDPM++, NCSN++, ADM or EDM2's magnitude-preserving one  [default: ddpmpp]",
              type=click.Choice(list(ARCHITECTURES)))
@click.option("--preset", help="An official EDM2 configuration (sets --arch=edm2 and its hyperparameters; options "
              "given explicitly win)", type=click.Choice(list(PRESETS)))
@click.option("--precond", help="Table 2 column: preconditioning with its matching loss",
              type=click.Choice(list(PRECONDITIONERS)), default="edm", show_default=True)
# Hyperparameters.
@click.option("--duration", help="Stop after this many million training images  [default: 200; edm2 1073.7]",
              metavar="MIMG", type=click.FloatRange(min=0, min_open=True))
@click.option("--max-minutes", help="Also stop, with a final snapshot, after this much wall-clock time",
              metavar="MIN", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--batch", help="Images per optimizer step, over all processes  [default: 512; edm2 2048]",
              metavar="INT", type=click.IntRange(min=1))
@click.option("--batch-gpu", help="Limit batch size per GPU (gradient accumulation)", metavar="INT",
              type=click.IntRange(min=1))
@click.option("--cbase", help="model_channels  [default: per architecture]", metavar="INT", type=click.IntRange(min=1))
@click.option("--cres", help="channel_mult, one per level, e.g. 2,2,2  [default: per architecture]",
              metavar="LIST", callback=parse_int_list)
@click.option("--blocks", help="Residual blocks per resolution  [default: 4 ddpmpp/ncsnpp, 3 adm]", metavar="INT",
              type=click.IntRange(min=1))
@click.option("--patch", help="--arch=edm2: the U-Net works on PxP patches of pixels as channels  [default: 1]",
              metavar="P", type=click.IntRange(min=1))
@click.option("--attn", help="Resolutions with self-attention, e.g. 16 or 32,16,8  [default: varies]", metavar="LIST",
              callback=parse_int_list)
@click.option("--lr", help="Adam learning rate after the ramp-up  [default: 0.001; edm2 0.01]",
              metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--lr-rampup", help="Learning-rate ramp-up  [default: 10000]", metavar="KIMG",
              type=click.FloatRange(min=0))
@click.option("--lr-decay", help="EDM2's decay: lr / sqrt(max(steps / this, 1)), 0 = constant  [default: 0; "
              "edm2 35000]", metavar="BATCHES", type=click.FloatRange(min=0))
@click.option("--lr-cooldown", help="Fraction of --duration at the end over which the learning rate falls linearly to "
              "0  [default: 0]", metavar="FRACTION", type=click.FloatRange(min=0, max=1), default=0)
@click.option("--adam-beta2", help="Adam's beta2, the decay of its squared-gradient average  [default: 0.999; edm2 "
              "0.99]", metavar="FLOAT", type=click.FloatRange(min=0, max=1, max_open=True))
@click.option("--ema", help="Half-life of the EMA weights, in million images  [default: 0.5]",
              metavar="MIMG", type=click.FloatRange(min=0))
@click.option("--ema-rampup", help="EMA ramp-up ratio, 0 = none", metavar="FLOAT", type=click.FloatRange(min=0),
              default=0.05, show_default=True)
@click.option("--ema-std", help="Also track a power-function EMA per relative std (EDM2's post-hoc EMA; any --arch), "
              "e.g. 0.050,0.100; 'none' = off  [default: none; edm2 0.050,0.100]", metavar="LIST",
              callback=parse_float_list)
@click.option("--dropout", help="Dropout in the U-Net blocks  [default: 0.13; edm2 0]", metavar="FLOAT",
              type=click.FloatRange(min=0, max=1))
@click.option("--dropout-res", "dropout_res", help="--arch=edm2: dropout only at this resolution and below  "
              "[default: everywhere]", metavar="RES", type=click.IntRange(min=1))
@click.option("--optimizer", help="adam, or radam (ECT's CIFAR-10 recipe)  [default: adam]",
              type=click.Choice(list(OPTIMIZERS)))
@click.option("--consistency", help="Tune into a consistency model for 1-4 step sampling (ECT; start from a "
              "trained network with --transfer; sample with --sampler=consistency)", is_flag=True)
@click.option("--ct-stage", "ct_stage", help="With --consistency: images per stage, after each of which the gap "
              "t - r halves  [default: --duration / 4]", metavar="KIMG", type=click.FloatRange(min=0, min_open=True))
@click.option("--ct-huber", "ct_huber", help="With --consistency: c of the pseudo-Huber distance  [default: 0, ECT's "
              "L2 norm]", metavar="FLOAT", type=click.FloatRange(min=0))
@click.option("--ct-q", "ct_q", help="With --consistency: the gap t - r shrinks by q per stage  [default: 2]",
              metavar="FLOAT", type=click.FloatRange(min=1, min_open=True))
@click.option("--ct-k", "ct_k", help="With --consistency: k of ECT's n(t) = 1 + k sigmoid(-b t)  [default: 8]",
              metavar="FLOAT", type=click.FloatRange(min=0))
@click.option("--ct-b", "ct_b", help="With --consistency: b of ECT's n(t)  [default: 1]", metavar="FLOAT", type=float)
@click.option("--ct-weight", "ct_weight", help="With --consistency: the loss weighting, ECT's 1 / (t - r) or EDM's "
              "(t^2 + sigma_data^2) / (t sigma_data)^2  [default: ect]", type=click.Choice(["ect", "edm"]))
@click.option("--ct-sigmas", "ct_sigmas", help="With --consistency: the noise levels the run's grids and metrics "
              "sample at with the consistency sampler, sigma_max first and sigma_min last (80,0.821,0.002: 2 calls)  "
              "[default: 2 calls on Eq. 5's levels]", metavar="LIST", callback=parse_consistency_levels)
@click.option("--distill", help="Consistency distillation from this teacher snapshot: the target is one step of its "
              "ODE (implies --consistency; the student starts as the teacher unless --transfer says otherwise)",
              metavar="PKL|URL")
@click.option("--distill-guide", "distill_guide", help="With --distill: guide the teacher by this snapshot "
              "(autoguidance) or 'uncond' (classifier-free guidance)", metavar="PKL|URL|uncond")
@click.option("--distill-guidance", "distill_guidance", help="With --distill-guide: the guidance weight w",
              metavar="FLOAT", type=float)
@click.option("--distill-step", "distill_step", help="With --distill: the teacher's ODE step from t to r  "
              "[default: heun]", type=click.Choice(["heun", "euler"]))
@click.option("--ct-recipe", "ct_recipe", help="ECT's published recipe (implies --consistency; given options win; "
              "docs/consistency.md)", type=click.Choice(list(CT_RECIPES)))
@click.option("--label-dropout", help="Train this fraction of images without their label (classifier-free guidance)",
              metavar="FLOAT", type=click.FloatRange(min=0, max=1), default=0, show_default=True)
@click.option("--p-mean", help="Mean of ln(sigma) in training  [default: -1.2; edm2 -0.8]", metavar="FLOAT",
              type=float)
@click.option("--p-std", help="Std of ln(sigma) in training  [default: 1.2; edm2 1.6]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--augment", help="Non-leaking augmentation probability p, 0 = off  [default: 0.12; edm2 0]",
              metavar="FLOAT", type=click.FloatRange(min=0, max=1))
@click.option("--vae", help="With a dataset of latents: the VAE that decodes them (sample grids, metrics; its name goes "
              "into the snapshots), a hub name or a diffusers folder", metavar="NAME|DIR",
              default=DEFAULT_VAE, show_default=True)
@click.option("--xflip", help="Also show every image mirrored (doubles the dataset)",
              metavar="BOOL", type=bool, default=False, show_default=True)
# Performance-related.
@click.option("--fp16", help="Enable mixed-precision training (CUDA)  [default: 0; 1 with --preset on CUDA, as "
              "train_edm2.py]", metavar="BOOL", type=bool)
@click.option("--bf16", help="Run the U-Net in bfloat16", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--ls", help="Multiply the loss by this before backward (fp16)",
              metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1,
              show_default=True)
@click.option("--sdpa", help="Fused attention (else the explicit einsum softmax)  [default: per device]",
              metavar="BOOL", type=bool)
@click.option("--channels-last", "channels_last", help="NHWC memory format  [default: per device; on a CPU for EDM2 "
              "networks only]", metavar="BOOL", type=bool)
@click.option("--fused-adam", "fused_adam", help="Fused Adam kernel  [default: per device]", metavar="BOOL", type=bool)
@click.option("--compile", "compile", help="torch.compile the network  [default: per device]", metavar="BOOL",
              type=bool)
@click.option("--tf32", help="TF32 matmuls/convolutions on Ampere+ GPUs  [default: off]", metavar="BOOL", type=bool)
@click.option("--retain-memory", "retain_memory",
              help="Keep freed host memory for reuse (glibc)  [default: per device]",
              metavar="BOOL", type=bool)
@click.option("--bench", help="Let cuDNN time its convolution algorithms",
              metavar="BOOL", type=bool, default=True, show_default=True)
@click.option("--cache", help="Keep decoded images in memory after first use", metavar="BOOL", type=bool, default=True,
              show_default=True)
@click.option("--workers", help="DataLoader worker processes (0 = load in the training process)", metavar="INT",
              type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--device", help="cuda, cuda:N or cpu  [default: CUDA if available]", metavar="DEV", type=str)
# I/O-related.
@click.option("--desc", help="Extra text for the run directory's name", metavar="STR", type=str)
@click.option("--nosubdir", help="Write straight into --outdir, no NNNNN-... subfolder", is_flag=True)
@click.option("--tick", help="Print a status line every this many thousand images",
              metavar="KIMG", type=click.FloatRange(min=0, min_open=True),
              default=50, show_default=True)
@click.option("--snap", help="Write a network snapshot every this many ticks",
              metavar="TICKS", type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option("--dump", help="Write a training state every this many ticks",
              metavar="TICKS", type=click.IntRange(min=1), default=500,
              show_default=True)
@click.option("--grid", help="Images in the sample grid saved with each snapshot, 0 = none", metavar="INT",
              type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--metrics", help="Measure these during training (EMA networks, in memory): fid, kid, fd_dinov2  "
                                "[default: none]",
              metavar="LIST", type=str, callback=lambda ctx, param, value: _parse_metrics(value))
@click.option("--metrics-num", "metrics_num", help="Images (seeds 0..N-1) per in-training evaluation",
              metavar="INT", type=click.IntRange(min=2), default=10000, show_default=True)
@click.option("--metrics-every", "metrics_every", help="Evaluate every this many ticks  [default: with each snapshot]",
              metavar="TICKS", type=click.IntRange(min=1))
@click.option("--metrics-steps", "metrics_steps", help="EDM sampler steps for the in-training metrics",
              metavar="INT", type=click.IntRange(min=1), default=DEFAULT_NUM_STEPS, show_default=True)
@click.option("--metrics-ref", "metrics_ref", help="Reference of the metrics: statistics (fid.py ref) or an image "
              "dataset  [default: --data; needed for latents]", metavar="PKL|NPZ|DIR|ZIP", type=str)
@click.option("--dinov2", help="DINOv2 ViT-L/14 weights for --metrics=fd_dinov2  [default: the official release, "
              "cached]", metavar="PATH|URL", type=str)
@click.option("--seed", help="Seed of the whole run  [default: drawn at random]", metavar="INT", type=int)
@click.option("--transfer", help="Start from the weights of this network snapshot (new optimizer and counters)",
              metavar="PKL|URL", type=str)
@click.option("--resume", help="Resume from previous training state, or 'auto' for the newest in --outdir",
              metavar="PT|auto", type=str)
@click.option("-n", "--dry-run", help="Show the resolved options and the run directory, train nothing", is_flag=True)
def main(**kwargs):
    """Train diffusion-based generative models as in the EDM paper.

    \b
    # DDPM++ on class-conditional CIFAR-10 with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
    \b
    # About five minutes on two CPU cores (dataset_tool.py makes the ZIP from data/fashion-mnist/)
    python train.py --outdir=training-runs --data=datasets/fashion-mnist-t10k-32x32.zip --cond=1 \\
        --cbase=32 --cres=1,2,2 --batch=32 --lr=1e-3 --lr-rampup=1 --dropout=0 --augment=0 \\
        --duration=0.005 --tick=1 --snap=5 --grid=16
    """
    try:
        train(resolve_defaults(dnnlib.EasyDict(kwargs)))
    except (click.ClickException, TrainingConfigError, StateFileError) as e:
        if not dist.is_main():  # Rank 0 reports it; the others just stop.
            sys.exit(1)
        raise e if isinstance(e, click.ClickException) else click.ClickException(str(e)) from None
    finally:
        dist.shutdown()


def _parse_metrics(value: str | None) -> list[str] | None:
    if value is None:
        return None
    from metrics.evaluate import parse_metrics
    try:
        metrics = parse_metrics(value)
        if "fd_dinov2" in metrics:
            from metrics.dinov2 import require_timm
            require_timm()
        return metrics
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def metrics_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict | None:
    """metrics_kwargs (training.loop.monitor.MetricsOptions) for --metrics, or None when no metrics are asked for."""
    if not opts.metrics:
        for name in ("metrics_ref", "dinov2"):
            if opts.get(name):
                raise click.ClickException(f"--{name.replace('_', '-')} goes with --metrics")
        return None
    metrics = dnnlib.EasyDict(metrics=list(opts.metrics), num_images=opts.metrics_num,
                              every_ticks=opts.metrics_every, num_steps=opts.metrics_steps)
    if opts.get("metrics_ref"):
        metrics.ref = opts.metrics_ref
    if opts.get("dinov2"):
        metrics.dinov2 = opts.dinov2
    return metrics


def check_transfer_file(path: str, option: str = "--transfer") -> None:
    """Open the --transfer (or ``option``'s) network before anything is written, so that a missing, foreign or unsafe
    file is one error line and leaves no run directory behind (the training loop opens it again)."""
    try:
        load_network_pkl(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason
        raise click.ClickException(f"{option}={path}: {reason}") from None


def config_warnings(c: dnnlib.EasyDict) -> list[str]:
    """Settings that run but defeat the run's purpose."""
    warnings = []
    if c.total_kimg < c.lr_rampup_kimg:
        reached = c.total_kimg / c.lr_rampup_kimg
        warnings.append(f"the run ends at {c.total_kimg:g} kimg, during the {c.lr_rampup_kimg:g}-kimg learning-rate "
                        f"ramp-up: the learning rate only reaches {reached:.2g} x --lr; shorten it with --lr-rampup")
    return warnings


def train(opts: dnnlib.EasyDict) -> None:
    try:
        dist.init(opts.device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    check_edm2_options(opts)
    if opts.ema_std:
        from training.ema.phema import sigma_rel_to_gamma
        try:
            sigma_rel_to_gamma(opts.ema_std)
        except ValueError as e:
            raise click.ClickException(f"--ema-std={','.join(f'{s:g}' for s in opts.ema_std)}: {e}") from None
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException("--transfer and --resume cannot be used together")
    if opts.fp16 and opts.bf16:
        raise click.ClickException("--fp16 and --bf16 cannot be used together")
    fp16_note = resolve_fp16(opts, dist.get_device())
    if opts.fp16:
        try:
            check_precision("fp16", dist.get_device())
        except ValueError as e:
            raise click.ClickException(f"--fp16=1: {e}") from None
    if opts.resume not in (None, "auto"):
        read_state_file(opts.resume)  # Fails early, with the reason, on a missing or foreign file.
    check_distill_options(opts)
    if opts.transfer is not None and opts.transfer != opts.get("distill"):
        check_transfer_file(opts.transfer)

    dataset_obj = open_dataset(opts)
    check_latent_options(opts, dataset_obj)
    c = build_config(opts, dataset_obj)
    check_network_fits_dataset(c.network_kwargs, dataset_obj.resolution, dataset_obj.num_channels)
    desc = run_description(opts, dataset_obj.name)
    del dataset_obj

    run_dir, resume = pick_run_dir(opts, desc) if dist.is_main() else (None, None)
    run_dir, resume = shared_from_rank0((run_dir, resume))
    c.update(run_dir=run_dir, resume_state_dump=resume, device=str(dist.get_device()))

    dist.print0(json.dumps(c, indent=2))
    dist.print0(f"Output directory: {run_dir}" + (f" (resuming {resume})" if resume else ""))
    for warning in config_warnings(c):
        dist.print0(f"Warning: {warning}")
    if fp16_note is not None:
        dist.print0(f"Note: {fp16_note}")
    if opts.dry_run:
        dist.print0("Dry run; exiting.")
        return
    error = None
    if dist.is_main():
        try:
            prepare_run_dir(run_dir, c)
        except click.ClickException as e:
            error = e.message
    error = shared_from_rank0(error)
    if error is not None:
        raise click.ClickException(error)
    training_loop(**c)


if __name__ == "__main__":
    main()
