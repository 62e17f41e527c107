"""The training loop's set-up: distributed state, data, network, optimizer, the (resumed) training state and the
in-training metrics, gathered in one ``Run``."""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.misc import InfiniteSampler, clone_module, copy_params_and_buffers
from torch_utils.training_stats import StatsCollector
from training.data.encoders import Encoder, StandardRGBEncoder
from training.ema.phema import PowerFunctionEMA
from training.loop.config import TrainingConfig, TrainingConfigError, batch_split, check_network_fits_dataset
from training.loop.monitor import InTrainingMetrics, LossBySigma, MetricsOptions, monitoring_sampler
from training.loop.progress import RunLog
from training.loop.state import TrainingState, capture_rng_state, restore_rank_rng, restore_rng_state
from training.loss import EDM2Loss
from training.perf import (FastPaths, adam_kwargs, apply_process_settings, default_fast_paths, maybe_compile,
                           prepare_network)


@dataclass
class Run:
    """Everything the loop works with, made by ``setup``."""

    config: TrainingConfig
    encoder: Encoder                     # The dataset's raw latents -> the network's (pixels: x / 127.5 - 1).
    device: torch.device
    state: TrainingState
    ddp: torch.nn.Module                 # The network to call for training (DDP-wrapped when world > 1).
    forward: torch.nn.Module             # What the loss calls: ``ddp``, compiled when the fast path is on.
    fast: FastPaths
    loss_fn: Any
    augment_pipe: Any
    data: Iterator
    dataset_obj: Any
    batch_gpu: int
    accumulation_rounds: int
    log: RunLog
    stats: StatsCollector
    start_time: float
    loss_by_sigma: LossBySigma | None = None
    metrics: InTrainingMetrics | None = None  # FID/KID during training (--metrics); None = off.


def seed_everything(seed: int) -> None:
    """Seed this rank's generators (torch, numpy, Python) from the run seed and the rank: each rank draws
    its own noise levels, noise, dropout and augmentations."""
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


def build_network(network_kwargs: dict, dataset_obj, device: torch.device,
                  encoder: Encoder | None = None) -> torch.nn.Module:
    """The network of ``network_kwargs`` for the dataset's images, or for the latents ``encoder`` makes of them."""
    channels = (encoder or StandardRGBEncoder()).latent_channels(dataset_obj.num_channels)
    check_network_fits_dataset(network_kwargs, dataset_obj.resolution, channels)
    interface = dict(img_resolution=dataset_obj.resolution, img_channels=channels, label_dim=dataset_obj.label_dim)
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


def setup(config: TrainingConfig, start_time: float) -> Run:
    """Distributed setup, data, network, optimizer, (resumed) training state and, with ``config.metrics_kwargs``,
    the detector and reference statistics of the in-training metrics."""
    device = dist.init(config.device) if not isinstance(config.device, torch.device) else config.device
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    apply_process_settings(default_fast_paths(device).with_options(**(config.fast_paths or {})))
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    log = RunLog(config.run_dir, tensorboard=config.tensorboard)
    batch_gpu, rounds = batch_split(config.batch_size, config.batch_gpu, dist.get_world_size())

    log.print("Loading dataset...")
    dataset_obj = dnnlib.construct_class_by_name(**config.dataset_kwargs)
    log.print(f"{dataset_obj.name}: {len(dataset_obj)} images, {dataset_obj.resolution}x{dataset_obj.resolution}, "
              f"{dataset_obj.num_channels} channels, {dataset_obj.label_dim} label dims")
    encoder = build_encoder(config.encoder_kwargs, device)
    state, fast = build_training_state(config, dataset_obj, encoder, device, log)
    loss_fn = dnnlib.construct_class_by_name(**config.loss_kwargs)
    if config.teacher_kwargs:
        loss_fn.teacher = load_teacher(**config.teacher_kwargs, device=device, log=log)
    freeze_what_the_loss_never_uses(state.net, loss_fn)
    ddp = state.net
    if dist.get_world_size() > 1:  # Broadcasts rank 0's initial weights; averages gradients in backward.
        ddp = distributed_data_parallel(state.net, device)
    augment_pipe = dnnlib.construct_class_by_name(**config.augment_kwargs) if config.augment_kwargs else None

    if config.resume_pkl is not None:
        transfer_weights(config.resume_pkl, state.net, state.ema, log)
    resume_data = None if config.resume_state_dump is None else load_state(state, config.resume_state_dump, log,
                                                                           device)
    metrics = setup_metrics(config.metrics_kwargs, config.dataset_kwargs, device, log,
                            decode=encoder.decode if config.encoder_kwargs else None,
                            loss_fn=loss_fn)
    data = open_data_stream(dataset_obj, config.seed, state.data_position, batch_gpu, config.data_loader_kwargs)
    # Last: nothing after this may draw random numbers before the first step.
    if resume_data is not None and not restore_rank_rng(resume_data, device):
        log.print(f"Note: the state was written by {resume_data.get('world_size')} processes, now "
                  f"{dist.get_world_size()}: training continues, but not bit-exactly")
    return Run(config=config, encoder=encoder, device=device, state=state, ddp=ddp, forward=maybe_compile(ddp, fast),
               fast=fast, loss_fn=loss_fn, augment_pipe=augment_pipe, data=data, dataset_obj=dataset_obj,
               batch_gpu=batch_gpu, accumulation_rounds=rounds, log=log, stats=StatsCollector(device),
               start_time=start_time, loss_by_sigma=LossBySigma(device), metrics=metrics)


def load_teacher(teacher: str, device: torch.device, log: RunLog, guide: str | None = None,
                 guidance: float = 1) -> torch.nn.Module:
    """The distillation teacher: a snapshot's EMA network in eval mode on ``device``, frozen, guided by ``guide`` (a
    snapshot, or 'uncond' for classifier-free guidance) with weight ``guidance`` (``training.sampling.guided``)."""
    from training.checkpoint import load_network
    from training.sampling.guidance import UNCONDITIONAL, guided

    def frozen(path: str) -> torch.nn.Module:
        try:
            return load_network(path, device=device).requires_grad_(False)
        except (OSError, ValueError) as e:
            raise TrainingConfigError(f"--distill: {str(e).splitlines()[0]}") from None

    net = frozen(teacher)
    guiding = None if guide is None else UNCONDITIONAL if guide == UNCONDITIONAL else frozen(guide)
    log.print(f"Distilling {teacher}" + ("" if guiding is None or guidance == 1 else
                                         f", guided by {guide} at w = {guidance:g}"))
    try:
        return guided(net, guiding, guidance)
    except ValueError as e:
        raise TrainingConfigError(f"--distill-guide: {e}") from None


def distributed_data_parallel(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` under DistributedDataParallel. Its buffers (Fourier frequencies, iDDPM levels) are the same on every
    process and never change, so they are not broadcast again before every call (one collective per call fewer, and
    none that a process calling the network more often than another could mismatch)."""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"  # Older torch; the buffers are equal from construction (one seed for all processes).
    return DDP(net, device_ids=[device] if device.type == "cuda" else None, **{no_buffer_sync: False})


LOGVAR_HEAD = "logvar_"  # The parameters of EDM2's uncertainty head u(sigma) start with it.


def freeze_what_the_loss_never_uses(net: torch.nn.Module, loss_fn) -> list[str]:
    """Stop tracking gradients of the parameters ``loss_fn`` never reaches, and return their names: the log-variance
    head of EDM2's networks, which only ``EDM2Loss`` trains (EDM2 Eq. 21). DistributedDataParallel waits for a
    gradient of every trainable parameter, so a head left trainable stops a multi-process run at its second step.
    Nothing else changes: without a gradient, the optimizer leaves these parameters as they were anyway."""
    if isinstance(loss_fn, EDM2Loss):
        return []
    frozen = []
    for name, p in net.named_parameters():
        if name.startswith(LOGVAR_HEAD) and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_training_state(config: TrainingConfig, dataset_obj, encoder: Encoder, device: torch.device,
                         log: RunLog) -> tuple[TrainingState, FastPaths]:
    """The network (the same initial weights for any number of processes), its EMA, the optimizer and the
    power-function EMAs, with the fast paths they run with; seeds this rank's generators after the network."""
    log.print("Constructing network...")
    torch.manual_seed(config.seed)
    net = build_network(config.network_kwargs, dataset_obj, device, encoder)
    seed_everything(config.seed)
    ema = clone_module(net).eval().requires_grad_(False)  # Contiguous, as snapshots are written.
    fast = default_fast_paths(device, net).with_options(**(config.fast_paths or {}))
    prepare_network(net, fast, precision=False)  # The precision is the network's own (--fp16, --bf16).
    log.print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters")
    optimizer = build_optimizer(config.optimizer_kwargs, net.parameters(), fast)
    dtype = net.compute_dtype(torch.empty(0, device=device)) if hasattr(net, "compute_dtype") else torch.float32
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    log.print(f"Fast paths: {fast.with_options(precision=precision).describe()}")
    state = TrainingState(net=net, ema=ema, optimizer=optimizer, extra=dict(
        batch_size=config.batch_size, seed=config.seed, network_kwargs=plain(config.network_kwargs)))
    if config.ema_stds:
        state.phema = PowerFunctionEMA(net, config.ema_stds)
    return state, fast


def build_encoder(encoder_kwargs: dict | None, device: torch.device) -> Encoder:
    """The encoder of ``encoder_kwargs`` (pixels without), its VAE loaded now so that a missing one stops the run
    before any work."""
    from training.data.encoders import VAEError
    if not encoder_kwargs:
        return StandardRGBEncoder()
    encoder = dnnlib.construct_class_by_name(**encoder_kwargs)
    try:
        encoder.init(device)
    except VAEError as e:
        raise TrainingConfigError(f"--vae: {e}") from None
    return encoder


def setup_metrics(metrics_kwargs: dict | None, dataset_kwargs: dict, device: torch.device,
                  log: RunLog, decode=None, loss_fn=None) -> InTrainingMetrics | None:
    """The detectors and the reference statistics (the dataset's computed once, then cached), when metrics are
    asked for; the training generators are left as they were (the reference's data loader draws a seed).
    ``decode`` makes the samples of a latent network pixels; the reference is then ``--metrics-ref``'s.
    The samples are made as ``monitoring_sampler`` makes them for ``loss_fn`` (None: EDM's Heun with the options'
    steps)."""
    from metrics.detector import DetectorError
    from metrics.reference import ReferenceFileError
    from training.data.dataset import DatasetError

    if not metrics_kwargs or not metrics_kwargs.get("metrics"):
        return None
    options = MetricsOptions(**metrics_kwargs)
    if decode is not None and options.ref is None:
        raise TrainingConfigError(f"--metrics: {dataset_kwargs['path']} holds latents; give the reference of the "
                                  f"images they were encoded from with --metrics-ref=PKL|NPZ|DIR (fid.py ref)")
    log.print(f"Loading the FID detector for in-training {', '.join(options.metrics).upper()} "
              f"({options.num_images} images, {options.num_steps} steps)...")
    rng = capture_rng_state(device)
    try:
        metrics = InTrainingMetrics(options, dataset_kwargs["path"], device, log, decode=decode,
                                    sampler=monitoring_sampler(loss_fn, options.num_steps))
    except (DetectorError, ReferenceFileError, DatasetError, ValueError) as e:
        raise TrainingConfigError(f"--metrics: {str(e).splitlines()[0]}") from None
    restore_rng_state(rng, device)
    return metrics


def plain(value):
    """EasyDicts and tuples as plain dicts and lists (for pickles and state files that others read)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
