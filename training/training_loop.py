"""The training loop of the paper (Section 5, Appendix F): Adam on the denoising loss of training/loss.py,
with learning-rate ramp-up, EMA of the weights, optional non-leaking augmentation, on any number of
processes (``torchrun``) or one.

It reads as three parts: ``setup`` (distributed, data, network, optimizer, state), ``train_step`` (loss,
backward, accumulate, update, EMA) and ``maintain`` (log, snapshot, state, stats). Multi-process training
uses ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), which averages gradients over ranks; in a
world of one the network is used directly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.misc import InfiniteSampler, clone_module, copy_params_and_buffers
from torch_utils.training_stats import StatsCollector
from training.checkpoint import save_network_pkl
from training.perf import FastPaths, adam_kwargs, apply_process_settings, as_memory_format, default_fast_paths, \
    maybe_compile, prepare_network
from training.lr_schedule import cooldown_factor, edm2_learning_rate
from training.monitor import InTrainingMetrics, LossBySigma, MetricsOptions, SigmaRecorder, network_label
from training.phema import PowerFunctionEMA, snapshot_name
from training.progress import RunLog, format_time, save_image_grid
from training.training_state import (TrainingState, capture_rng_state, kimg_label, restore_rank_rng,
                                     restore_rng_state)


class TrainingConfigError(ValueError):
    """Options that cannot work together (e.g. a network that does not fit the dataset); one clear line."""


@dataclass
class Run:
    """Everything the loop works with, made by ``setup``."""

    device: torch.device
    state: TrainingState
    ddp: torch.nn.Module                 # The network to call for training (DDP-wrapped when world > 1).
    forward: torch.nn.Module             # What the loss calls: ``ddp``, compiled when the fast path is on.
    fast: FastPaths
    loss_fn: Any
    augment_pipe: Any
    optimizer_lr: float
    data: Iterator
    dataset_obj: Any
    dataset_kwargs: dict
    batch_size: int
    batch_gpu: int
    accumulation_rounds: int
    run_dir: str
    log: RunLog
    stats: StatsCollector
    options: dict                        # The remaining hyperparameters of training_loop().
    start_time: float
    loss_by_sigma: LossBySigma | None = None
    metrics: InTrainingMetrics | None = None  # FID/KID during training (--metrics); None = off.


# ----------------------------------------------------------------------------
# Setup.

def batch_split(batch_size: int, batch_gpu: int | None, world_size: int) -> tuple[int, int]:
    """(images per forward pass, accumulation rounds) for a global batch over ``world_size`` processes."""
    if batch_size % world_size:
        raise TrainingConfigError(f"--batch={batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    batch_gpu = per_rank if batch_gpu is None or batch_gpu > per_rank else batch_gpu
    if per_rank % batch_gpu:
        raise TrainingConfigError(f"--batch-gpu={batch_gpu} does not divide the per-process batch {per_rank} "
                                  f"(--batch={batch_size} over {world_size} processes)")
    return batch_gpu, per_rank // batch_gpu


def check_network_fits_dataset(network_kwargs: dict, resolution: int, channels: int) -> None:
    """The U-Net halves the resolution len(channel_mult) - 1 times, after patches of patch_size (EDM2's U-Net)
    make it 1 / patch_size: the dataset must allow it."""
    levels = len(network_kwargs.get("channel_mult", ()))
    patch = network_kwargs.get("patch_size", 1)
    if resolution % patch:
        raise TrainingConfigError(f"--patch={patch} does not divide the dataset's {resolution}x{resolution} images; "
                                  f"use a --patch that does or resize the dataset")
    patched = resolution // patch
    if levels and (patched % (1 << (levels - 1)) or patched >> (levels - 1) < 1):
        at = f" ({patched}x{patched} in patches of {patch})" if patch > 1 else ""
        raise TrainingConfigError(
            f"--cres={','.join(str(m) for m in network_kwargs['channel_mult'])}: {levels} resolution levels halve "
            f"the images {levels - 1} times, but the dataset's {resolution}x{resolution} images{at} do not allow it; "
            f"use a --cres with fewer entries or resize the dataset")
    if channels < 1:
        raise TrainingConfigError(f"the dataset has {channels} image channels")


def seed_everything(seed: int) -> None:
    """Seed this rank's generators (torch, numpy, Python) from the run seed and the rank: each rank draws
    its own noise levels, noise, dropout and augmentations."""
    import random

    rank_seed = (seed * dist.get_world_size() + dist.get_rank()) % (1 << 31)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)


PREFETCH_BATCHES = 2  # Per DataLoader worker.


def data_loader_kwargs(device: torch.device, workers: int) -> dict:
    """DataLoader options of a training run: ``workers`` processes that each keep ``PREFETCH_BATCHES`` batches
    ready, in pinned memory on CUDA (so the copy to the device runs asynchronously, ``non_blocking=True``)."""
    return dict(num_workers=workers, prefetch_factor=PREFETCH_BATCHES, pin_memory=torch.device(device).type == "cuda")


def open_data_stream(dataset_obj, seed: int, start: int, batch_gpu: int, loader_kwargs: dict) -> Iterator:
    """This rank's endless iterator of (uint8 images, labels) batches, from global stream position ``start``."""
    sampler = InfiniteSampler(dataset_obj, rank=dist.get_rank(), num_replicas=dist.get_world_size(), seed=seed,
                              start=start)
    loader_kwargs = dict(loader_kwargs)
    if loader_kwargs.get("num_workers", 0) == 0:
        loader_kwargs.pop("prefetch_factor", None)
    return iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu, **loader_kwargs))


def build_optimizer(optimizer_kwargs: dict, params, fast: FastPaths) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer_kwargs``; Adam gets the fused or the for-loop implementation as ``fast``
    says, unless the kwargs choose one themselves."""
    kwargs = dict(optimizer_kwargs)
    if kwargs["class_name"] in ("torch.optim.Adam", "torch.optim.AdamW") and not {"fused", "foreach"} & kwargs.keys():
        kwargs.update(adam_kwargs(fast))
    return dnnlib.construct_class_by_name(params=params, **kwargs)


def build_network(network_kwargs: dict, dataset_obj, device: torch.device) -> torch.nn.Module:
    check_network_fits_dataset(network_kwargs, dataset_obj.resolution, dataset_obj.num_channels)
    interface = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                     label_dim=dataset_obj.label_dim)
    net = dnnlib.construct_class_by_name(**network_kwargs, **interface)
    return net.train().requires_grad_(True).to(device)


def transfer_weights(resume_pkl: str, net: torch.nn.Module, ema: torch.nn.Module, log: RunLog) -> None:
    """Start from a snapshot's EMA weights (``--transfer``): tensors of matching name and shape are copied."""
    from training.checkpoint import load_network_pkl

    log.print(f"Loading network weights from {resume_pkl}")
    source = load_network_pkl(resume_pkl)["ema"]
    for attr in ("img_resolution", "img_channels"):
        if getattr(source, attr, None) != getattr(net, attr):
            raise TrainingConfigError(f"--transfer={resume_pkl}: the network has {attr}={getattr(source, attr, None)}"
                                      f" but the dataset needs {getattr(net, attr)}")
    copied = copy_params_and_buffers(source, net)
    copy_params_and_buffers(source, ema)
    log.print(f"Transferred {len(copied)} of {len(net.state_dict())} tensors")
    skipped = untransferred(source, net, copied)
    if skipped:
        log.print(f"Kept the new initialisation of {len(skipped)}: " + "; ".join(skipped))


def untransferred(source: torch.nn.Module, net: torch.nn.Module, copied: list[str]) -> list[str]:
    """'name (why)' for each parameter or buffer of ``net`` that was not copied from ``source``."""
    theirs = dict(source.named_parameters()) | dict(source.named_buffers())
    reasons = []
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        if name in copied:
            continue
        if name not in theirs:
            reasons.append(f"{name} (not in the snapshot)")
        else:
            reasons.append(f"{name} (shape {list(theirs[name].shape)} there, {list(tensor.shape)} here)")
    return reasons


def load_state(state: TrainingState, path: str, log: RunLog, device: torch.device) -> dict:
    """Continue from a training-state file; returns its contents (the caller restores the RNG states)."""
    log.print(f"Loading training state from {path}")
    data = state.load(path, device)
    if data.get("batch_size") != state.extra["batch_size"]:
        log.print(f"Note: the state was written with --batch={data.get('batch_size')}, now {state.extra['batch_size']}")
    return data


def setup(run_dir: str, dataset_kwargs: dict, data_loader_kwargs: dict, network_kwargs: dict, loss_kwargs: dict,
          optimizer_kwargs: dict, augment_kwargs: dict | None, seed: int, batch_size: int, batch_gpu: int | None,
          resume_pkl: str | None, resume_state_dump: str | None, cudnn_benchmark: bool, device,
          tensorboard: bool, options: dict, start_time: float, fast_paths: dict | None = None,
          metrics_kwargs: dict | None = None) -> Run:
    """Distributed setup, data, network, optimizer, (resumed) training state and, with ``metrics_kwargs``, the
    detector and reference statistics of the in-training metrics."""
    device = dist.init(device) if not isinstance(device, torch.device) else device
    torch.backends.cudnn.benchmark = cudnn_benchmark
    apply_process_settings(default_fast_paths(device).with_options(**(fast_paths or {})))
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    log = RunLog(run_dir, tensorboard=tensorboard)
    batch_gpu, rounds = batch_split(batch_size, batch_gpu, dist.get_world_size())

    log.print("Loading dataset...")
    dataset_obj = dnnlib.construct_class_by_name(**dataset_kwargs)
    log.print(f"{dataset_obj.name}: {len(dataset_obj)} images, {dataset_obj.resolution}x{dataset_obj.resolution}, "
              f"{dataset_obj.num_channels} channels, {dataset_obj.label_dim} label dims")

    log.print("Constructing network...")
    torch.manual_seed(seed)  # The same initial network for any number of processes.
    net = build_network(network_kwargs, dataset_obj, device)
    seed_everything(seed)
    ema = clone_module(net).eval().requires_grad_(False)  # Contiguous, as snapshots are written.
    fast = default_fast_paths(device, net).with_options(**(fast_paths or {}))
    prepare_network(net, fast, precision=False)  # The precision is the network's own (--fp16, --bf16).
    log.print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters")
    loss_fn = dnnlib.construct_class_by_name(**loss_kwargs)
    augment_pipe = dnnlib.construct_class_by_name(**augment_kwargs) if augment_kwargs else None
    optimizer = build_optimizer(optimizer_kwargs, net.parameters(), fast)
    ddp = net
    if dist.get_world_size() > 1:  # Broadcasts rank 0's initial weights; averages gradients in backward.
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    dtype = net.compute_dtype(torch.empty(0, device=device)) if hasattr(net, "compute_dtype") else torch.float32
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    log.print(f"Fast paths: {fast.with_options(precision=precision).describe()}")
    state = TrainingState(net=net, ema=ema, optimizer=optimizer,
                          extra=dict(batch_size=batch_size, seed=seed, network_kwargs=_plain(network_kwargs)))
    if options.get("ema_stds"):
        state.phema = PowerFunctionEMA(net, options["ema_stds"])

    if resume_pkl is not None:
        transfer_weights(resume_pkl, net, ema, log)
    resume_data = load_state(state, resume_state_dump, log, device) if resume_state_dump is not None else None
    metrics = setup_metrics(metrics_kwargs, dataset_kwargs, device, log)
    data = open_data_stream(dataset_obj, seed, state.data_position, batch_gpu, data_loader_kwargs)
    # Last: nothing after this may draw random numbers before the first step.
    if resume_data is not None and not restore_rank_rng(resume_data, device):
        log.print(f"Note: the state was written by {resume_data.get('world_size')} processes, now "
                  f"{dist.get_world_size()}: training continues, but not bit-exactly")
    return Run(device=device, state=state, ddp=ddp, forward=maybe_compile(ddp, fast), fast=fast, loss_fn=loss_fn,
               augment_pipe=augment_pipe, optimizer_lr=optimizer_kwargs["lr"], data=data, dataset_obj=dataset_obj,
               dataset_kwargs=_plain(dataset_kwargs), batch_size=batch_size, batch_gpu=batch_gpu,
               accumulation_rounds=rounds, run_dir=run_dir, log=log, stats=StatsCollector(device), options=options,
               start_time=start_time, loss_by_sigma=LossBySigma(device), metrics=metrics)


def setup_metrics(metrics_kwargs: dict | None, dataset_kwargs: dict, device: torch.device,
                  log: RunLog) -> InTrainingMetrics | None:
    """The detector and the dataset's reference statistics (computed once, then cached), when metrics are asked
    for; the training generators are left as they were (the reference's data loader draws a seed)."""
    from metrics.detector import DetectorError
    from metrics.reference import ReferenceFileError

    if not metrics_kwargs or not metrics_kwargs.get("metrics"):
        return None
    options = MetricsOptions(**metrics_kwargs)
    log.print(f"Loading the FID detector for in-training {', '.join(options.metrics).upper()} "
              f"({options.num_images} images, {options.num_steps} steps)...")
    rng = capture_rng_state(device)
    try:
        metrics = InTrainingMetrics(options, dataset_kwargs["path"], device, log)
    except (DetectorError, ReferenceFileError) as e:
        raise TrainingConfigError(f"--metrics: {str(e).splitlines()[0]}") from None
    restore_rng_state(rng, device)
    return metrics


def _plain(value):
    """EasyDicts and tuples as plain dicts and lists (for pickles and state files that others read)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------
# One optimizer step.

def learning_rate(base_lr: float, cur_nimg: int, lr_rampup_kimg: float, batch_size: int = 1,
                  lr_decay_batches: float = 0, total_nimg: int = 0, lr_cooldown: float = 0) -> float:
    """EDM: linear ramp-up from 0 to ``base_lr`` over the first ``lr_rampup_kimg`` thousand images, then constant.
    With ``lr_decay_batches`` > 0, EDM2's schedule (its Section 2, Eq. 69 of the arXiv version): the ramped rate
    divided by sqrt(max(t / lr_decay_batches, 1)), t = optimizer steps so far. With ``lr_cooldown`` > 0, either
    falls linearly to 0 over that fraction of the run's ``total_nimg`` images at its end."""
    if lr_decay_batches > 0:
        lr = edm2_learning_rate(cur_nimg, batch_size, ref_lr=base_lr, ref_batches=lr_decay_batches,
                                rampup_Mimg=lr_rampup_kimg / 1000)
    else:
        lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
    return lr * cooldown_factor(cur_nimg, total_nimg, lr_cooldown)


def ema_beta(cur_nimg: int, batch_size: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None) -> float:
    """Per-step EMA decay for a half-life in images; during ramp-up the half-life is at most
    ``ema_rampup_ratio`` times the images seen so far."""
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def accumulate_gradients(run: Run) -> None:
    """Forward and backward over this rank's share of the global batch, in ``accumulation_rounds`` passes.
    Gradients are those of the loss summed over images divided by the per-rank batch (then averaged over
    ranks by DDP): the mean over the global batch, whatever the split."""
    per_rank = run.batch_gpu * run.accumulation_rounds
    loss_scaling = run.options["loss_scaling"]
    net = SigmaRecorder(run.forward)  # The loss draws each image's sigma; the network call shows it.
    for round_idx in range(run.accumulation_rounds):
        last = round_idx == run.accumulation_rounds - 1
        sync = contextlib.nullcontext() if last or run.ddp is run.state.net else run.ddp.no_sync()
        with sync:
            images, labels = next(run.data)
            images = images.to(run.device, non_blocking=True).to(torch.float32) / 127.5 - 1
            labels = drop_labels(labels.to(run.device, non_blocking=True), run.options["label_dropout"])
            loss = run.loss_fn(net=net, images=as_memory_format(images, run.fast), labels=labels,
                               augment_pipe=run.augment_pipe)
            run.stats.report("Loss/loss", loss)
            if run.loss_by_sigma is not None:
                run.loss_by_sigma.report(run.stats, net.sigma, loss)
            loss.sum().mul(loss_scaling / per_rank).backward()


def drop_labels(labels: torch.Tensor, probability: float) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each image's class vector is zeroed (the network's
    'unconditional' input) with ``probability``. No random draw at all when the probability is 0."""
    if probability <= 0 or labels.ndim != 2 or labels.shape[1] == 0:
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= probability
    return labels * keep.to(labels.dtype)


def sanitize_gradients(net: torch.nn.Module) -> torch.Tensor:
    """Replace NaN by 0 and +-inf by +-1e5 in the gradients (as the official loop); returns how many
    gradient entries were not finite."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    nonfinite = sum((~g.isfinite()).sum() for g in grads) if grads else torch.zeros([])
    for g in grads:
        torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
    return nonfinite


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- lerp(net, ema, beta) = net + beta (ema - net), the official formula, over all parameters in a
    few multi-tensor kernels (bit-identical to a loop over parameters)."""
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))


def train_step(run: Run) -> None:
    """Algorithm: accumulate gradients of the batch, ramp the learning rate, clean the gradients, Adam,
    EMA, and count the images."""
    state, opts = run.state, run.options
    state.optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(run)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(run.optimizer_lr, state.cur_nimg, opts["lr_rampup_kimg"], run.batch_size,
                                    opts["lr_decay_batches"], opts["total_nimg"], opts["lr_cooldown"])
    run.stats.report0("Loss/nonfinite_grads", sanitize_gradients(state.net))
    state.optimizer.step()
    update_ema(state.ema, state.net, ema_beta(state.cur_nimg, run.batch_size, opts["ema_halflife_kimg"],
                                              opts["ema_rampup_ratio"]))
    state.cur_nimg += run.batch_size
    if state.phema is not None:
        state.phema.update(state.cur_nimg, run.batch_size)


# ----------------------------------------------------------------------------
# Maintenance, once per tick.

@dataclass
class Tick:
    start_nimg: int
    start_time: float
    maintenance_sec: float               # Time spent between the previous tick's end and this tick's start.
    first: bool = False                  # Tick 0 of a run ends after one step (as the official); a resumed run
                                         # continues the tick schedule instead.


# The status line: (label, stat name, format of the shown value) per field, in the order shown. Each field is
# also reported as that stat; the total time is shown through format_time.
STATUS_FIELDS = (
    ("tick", "Progress/tick", "<5d"),
    ("kimg", "Progress/kimg", "<9.3f"),
    ("time", "Timing/total_sec", "<12s"),
    ("sec/tick", "Timing/sec_per_tick", "<7.1f"),
    ("sec/kimg", "Timing/sec_per_kimg", "<7.2f"),
    ("maintenance", "Timing/maintenance_sec", "<6.1f"),
    ("cpumem", "Resources/cpu_mem_gb", "<6.2f"),
    ("gpumem", "Resources/peak_gpu_mem_gb", "<6.2f"),
    ("reserved", "Resources/peak_gpu_mem_reserved_gb", "<6.2f"),
)


def tick_measurements(run: Run, tick: Tick) -> dict[str, float]:
    """The numbers of the status line, by stat name, measured now (GPU peaks since the last reset)."""
    now = time.time()
    gib = 2 ** 30
    on_cuda = run.device.type == "cuda"
    tick_sec = now - tick.start_time
    return {
        "Progress/tick": run.state.cur_tick,
        "Progress/kimg": run.state.cur_nimg / 1e3,
        "Timing/total_sec": now - run.start_time,
        "Timing/sec_per_tick": tick_sec,
        "Timing/sec_per_kimg": tick_sec / max(run.state.cur_nimg - tick.start_nimg, 1) * 1e3,
        "Timing/maintenance_sec": tick.maintenance_sec,
        "Resources/cpu_mem_gb": psutil.Process(os.getpid()).memory_info().rss / gib,
        "Resources/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(run.device) / gib if on_cuda else 0.0,
        "Resources/peak_gpu_mem_reserved_gb": torch.cuda.max_memory_reserved(run.device) / gib if on_cuda else 0.0,
    }


def status_line(values: dict[str, float], latest_metrics: dict[str, float] | None = None) -> str:
    """``tick 3     kimg 1.536     time 2m 05s ...`` from ``tick_measurements``, then the latest in-training
    metrics of the EMA (``fid 12.34``) when there are some."""
    shown = dict(values)
    shown["Timing/total_sec"] = format_time(values["Timing/total_sec"])
    fields = [f"{label} {shown[stat]:{spec}}" for label, stat, spec in STATUS_FIELDS]
    fields += [f"{name} {value:<7.4g}" for name, value in (latest_metrics or {}).items()]
    return " ".join(fields)


def ema_halflife_kimg(cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None) -> float:
    """The EMA half-life in kimg that ``ema_beta`` uses at ``cur_nimg`` (ramped up to ``ema_halflife_kimg``)."""
    if ema_rampup_ratio is None:
        return ema_halflife_kimg
    return min(ema_halflife_kimg, cur_nimg * ema_rampup_ratio / 1000)


def report_progress(run: Run, tick: Tick) -> None:
    """The status line (rank 0) and the same numbers in the stats."""
    values = tick_measurements(run, tick)
    for _label, stat, _spec in STATUS_FIELDS:
        run.stats.report0(stat, values[stat])
    total_sec = values["Timing/total_sec"]
    run.stats.report0("Timing/total_hours", total_sec / 3600)
    run.stats.report0("Timing/total_days", total_sec / 86400)
    run.stats.report0("Progress/lr", run.state.optimizer.param_groups[0]["lr"])
    run.stats.report0("Progress/ema_halflife_kimg", ema_halflife_kimg(
        run.state.cur_nimg, run.options["ema_halflife_kimg"], run.options["ema_rampup_ratio"]))
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.log.print(status_line(values, run.metrics.latest if run.metrics is not None else None))


def save_snapshot(run: Run) -> str:
    """``network-snapshot-KKKKKK.pkl`` in the official format (see ``kimg_label``), plus a sample grid from the EMA;
    with power-function EMAs also one ``network-snapshot-KKKKKKK-S.SSS.pkl`` per sigma_rel, the official EDM2
    names that ``reconstruct_phema.py`` reads (see ``training.phema.snapshot_name``)."""
    kimg = kimg_label(run.state.cur_nimg)
    path = os.path.join(run.run_dir, f"network-snapshot-{kimg}.pkl")
    if dist.is_main():
        emas = {path: run.state.ema}
        if run.state.phema is not None:
            emas.update((os.path.join(run.run_dir, snapshot_name(run.state.cur_nimg, std)), module)
                        for std, module in run.state.phema.emas.items())
        for ema_path, module in emas.items():
            ema = clone_module(module, device="cpu").eval().requires_grad_(False)
            save_network_pkl(ema_path, dict(ema=ema, loss_fn=run.loss_fn, augment_pipe=run.augment_pipe,
                                             dataset_kwargs=run.dataset_kwargs))
        if run.options["grid_images"]:
            save_sample_grid(run, os.path.join(run.run_dir, f"samples-{kimg}.png"))
    return path


def grid_seeds(run: Run) -> list[int]:
    return list(range(run.options["grid_images"]))


def save_data_grid(run: Run) -> None:
    """The first grid: training images, for comparison with the samples."""
    if dist.is_main() and run.options["grid_images"]:
        count = min(run.options["grid_images"], len(run.dataset_obj))
        images = np.stack([run.dataset_obj[i][0] for i in range(count)])
        save_image_grid(images, os.path.join(run.run_dir, "samples-data.png"))


@torch.no_grad()
def save_sample_grid(run: Run, path: str) -> None:
    """Images from the EMA network for fixed seeds (EDM sampler, a few steps)."""
    from training.sampling import generate_images

    images = generate_images(run.state.ema, grid_seeds(run), device=run.device,
                             num_steps=run.options["grid_steps"])
    save_image_grid(images, path)


def save_state(run: Run) -> str:
    path = os.path.join(run.run_dir, f"training-state-{kimg_label(run.state.cur_nimg)}.pt")
    run.state.save(path, run.device)
    return path


def evaluate_metrics(run: Run) -> None:
    """FID/KID of the EMA and of each power-function EMA, in memory, for seeds 0..N-1 (all processes take part);
    one line each in ``metrics.jsonl``, TensorBoard and the log."""
    networks = {network_label(): run.state.ema}
    if run.state.phema is not None:
        networks.update((network_label(std), module) for std, module in run.state.phema.emas.items())
    records = run.metrics.evaluate(networks, run.state.cur_nimg / 1e3)
    run.log.write_metrics(records)
    for r in records:
        run.log.print(f"{r['metric'].upper()} {r['value']:g} ({r['network']}, {r['num_images']} images, "
                      f"{r['seconds']:.1f} s)")


def maintain(run: Run, tick: Tick, done: bool, stop_requested: bool) -> None:
    """Once per tick: status line, snapshot and sample grid, metrics, stats, training state. Leaves the
    training generators as they were, so that where ticks fall (and whether metrics are on) never changes the
    trained weights."""
    opts, state = run.options, run.state
    report_progress(run, tick)
    snapshot = opts["snapshot_ticks"] is not None and (done or state.cur_tick % opts["snapshot_ticks"] == 0)
    measure = run.metrics is not None and run.metrics.due(state.cur_tick, done, snapshot)
    if snapshot or measure:
        rng = capture_rng_state(run.device)
        if snapshot:
            save_snapshot(run)
        if measure:
            evaluate_metrics(run)
        restore_rng_state(rng, run.device)
    dump = stop_requested or (opts["state_dump_ticks"] is not None
                              and (done or (state.cur_tick != 0 and state.cur_tick % opts["state_dump_ticks"] == 0)))
    run.log.write_stats(run.stats.collect(), state.cur_nimg / 1e3)
    state.cur_tick += 1  # A saved state resumes with the next tick.
    if dump:
        path = save_state(run)
        if stop_requested:
            run.log.print(f"Stop requested (SIGTERM): saved {path}")


# ----------------------------------------------------------------------------

def release(run: Run) -> None:
    """Free the DDP wrapper and the data stream now, and let every rank get here, so that no rank tears down
    the process group (or exits) while another still holds objects that use it."""
    run.ddp = run.forward = run.data = None
    gc.collect()
    dist.barrier()


class StopRequest:
    """Why to stop early: SIGTERM (e.g. SLURM pre-emption; the loop saves a state at the next step and exits
    cleanly) or a wall-clock deadline (the loop ends as if the duration were reached, with a final snapshot).
    All ranks agree on both, so none waits for the others in a collective call."""

    def __init__(self, device: torch.device, deadline: float | None = None):
        self.device = device
        self.deadline = deadline  # time.time() value, or None.
        self.requested = False
        self._previous = None
        self._pending: torch.Tensor | None = None  # The flags summed over ranks at the previous step.
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> tuple[bool, bool]:
        """(any rank got SIGTERM, any rank passed the deadline). With several processes the flags are summed
        asynchronously and the sum started at one step is read at the next, when the device has long finished
        it: the host never waits for the current step (every rank still stops at the same step, one step later)."""
        flags = [self.requested, self.deadline is not None and time.time() >= self.deadline]
        if dist.get_world_size() == 1:
            return flags[0], flags[1]
        previous = self._pending
        # Fill kernels, not torch.tensor(..., device=): a host-to-device copy from pageable memory would block.
        local = torch.full([2], float(flags[0]), device=self.device)
        local[1:].fill_(float(flags[1]))
        self._pending = dist.all_reduce_sum(local)
        if previous is None:
            return False, False
        sigterm, late = previous.tolist()
        return sigterm > 0, late > 0

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def training_loop(
    run_dir: str = ".",                 # Output directory (the run directory).
    dataset_kwargs: dict = {},          # training.dataset.ImageFolderDataset options.
    data_loader_kwargs: dict = {},      # torch.utils.data.DataLoader options.
    network_kwargs: dict = {},          # Preconditioner and U-Net options.
    loss_kwargs: dict = {},             # Loss options (training.loss.*).
    optimizer_kwargs: dict = {},        # Optimizer options (class_name, lr, betas, eps).
    augment_kwargs: dict | None = None, # AugmentPipe options; None = no augmentation.
    seed: int = 0,                      # Run seed (each rank derives its own).
    batch_size: int = 512,              # Global batch, in images per optimizer step.
    batch_gpu: int | None = None,       # Images per forward pass per process (gradient accumulation).
    total_kimg: float = 200000,         # Training duration, thousands of images.
    ema_halflife_kimg: float = 500,     # EMA half-life, thousands of images.
    ema_rampup_ratio: float | None = 0.05,  # EMA half-life ramp-up ratio; None = no ramp-up.
    lr_rampup_kimg: float = 10000,      # Learning-rate ramp-up, thousands of images.
    loss_scaling: float = 1,            # Loss scaling (against fp16 underflow).
    kimg_per_tick: float = 50,          # Thousands of images per tick (log line, stats).
    snapshot_ticks: int | None = 50,    # Ticks between network snapshots; None = never.
    state_dump_ticks: int | None = 500, # Ticks between training states; None = never.
    resume_pkl: str | None = None,      # Start from this snapshot's EMA weights (--transfer).
    resume_state_dump: str | None = None,  # Continue exactly from this training state (--resume).
    resume_kimg: float = 0,             # Unused (the state knows its progress); kept for official configs.
    cudnn_benchmark: bool = True,       # torch.backends.cudnn.benchmark.
    device: str | torch.device | None = None,  # None = pick automatically.
    grid_images: int = 64,              # Images in each sample grid; 0 = no grids.
    grid_steps: int = 18,               # Sampler steps for the grids.
    tensorboard: bool = True,           # TensorBoard scalars when the package is installed.
    fast_paths: dict | None = None,     # training.perf.FastPaths switches; None or missing = the device's defaults.
    max_minutes: float | None = None,   # Also end (with a final snapshot) after this much wall-clock time.
    lr_decay_batches: float = 0,        # EDM2: lr / sqrt(max(steps / this, 1)) after the ramp-up; 0 = constant.
    lr_cooldown: float = 0,             # Fraction of total_kimg at the end over which lr falls linearly to 0.
    ema_stds: list[float] | None = None,  # EDM2: sigma_rel of the power-function EMAs to track; None = none.
    label_dropout: float = 0,           # Probability of training an image without its label (for guidance).
    metrics_kwargs: dict | None = None, # training.monitor.MetricsOptions: FID/KID during training; None = off.
) -> TrainingState:
    """Train until ``total_kimg`` thousand images have been seen, ``max_minutes`` have passed since the call
    (setup included), or SIGTERM; returns the final state."""
    options = dict(loss_scaling=loss_scaling, lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                   ema_rampup_ratio=ema_rampup_ratio, snapshot_ticks=snapshot_ticks,
                   state_dump_ticks=state_dump_ticks, grid_images=grid_images, grid_steps=grid_steps,
                   lr_decay_batches=lr_decay_batches, ema_stds=list(ema_stds or []), label_dropout=label_dropout,
                   lr_cooldown=lr_cooldown, total_nimg=int(round(total_kimg * 1000)))
    start_time = time.time()
    run = setup(run_dir, dataset_kwargs, data_loader_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs,
                augment_kwargs, seed, batch_size, batch_gpu, resume_pkl, resume_state_dump, cudnn_benchmark,
                device, tensorboard, options, start_time, fast_paths, metrics_kwargs)
    state = run.state
    if state.cur_nimg == 0:
        save_data_grid(run)
    stop = StopRequest(run.device, deadline=None if max_minutes is None else start_time + max_minutes * 60)
    total_nimg = int(round(total_kimg * 1000))
    run.log.print(f"Training from {state.cur_nimg / 1e3:g} to {total_nimg / 1e3:g} kimg "
                  f"({dist.get_world_size()} processes on {run.device.type}, batch {batch_size} = "
                  f"{run.batch_gpu} x {run.accumulation_rounds} rounds x {dist.get_world_size()})")
    tick = Tick(start_nimg=state.cur_nimg, start_time=time.time(), maintenance_sec=time.time() - start_time,
                first=state.cur_tick == 0)
    try:
        while True:
            train_step(run)
            stopping, out_of_time = stop.agreed()
            done = state.cur_nimg >= total_nimg or out_of_time
            if out_of_time and state.cur_nimg < total_nimg:
                run.log.print(f"Time limit of {max_minutes:g} min reached at {state.cur_nimg / 1e3:g} kimg")
            if done or stopping or tick.first or state.cur_nimg >= tick.start_nimg + kimg_per_tick * 1000:
                tick_end = time.time()
                maintain(run, tick, done, stopping)
                if done or stopping:
                    break
                tick = Tick(start_nimg=state.cur_nimg, start_time=time.time(), maintenance_sec=time.time() - tick_end)
    finally:
        stop.restore()
        release(run)
    run.log.print(f"Done: {state.cur_nimg / 1e3:g} kimg in {format_time(time.time() - run.start_time)}; "
                  f"results in {run.run_dir}")
    run.log.close()
    return state
