"""Sampling to image files, or to detector features in memory: the library behind ``generate.py`` and
``fid.py calc --network``. Both load networks through ``load_network_once_per_node``, which gives the network and
the way its samples become pixels: ``to_uint8`` for pixel networks, the snapshot's encoder's ``decode`` for latent
ones (EDM2's img512 models, through Stability's VAE: ``training.data.encoders``).

Seeds are split into batches and the batches shared among processes (``torchrun``); since each image
depends only on its seed (see ``training.sampling.sample.generate_images``), the files are the same for any
batch size and any number of processes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metrics.features import compute_features, generated_batches
from torch_utils import distributed
from training.checkpoint import UnresolvedObject, load_network_pkl
from training.images import image_grid, save_png
from training.perf import (apply_process_settings, check_precision, default_fast_paths, maybe_compile,
                           prepare_network)
from training.sampling.guidance import UNCONDITIONAL, guided
from training.sampling.sample import generate_images, to_uint8
from training.sampling.spec import PaperSampler, SamplerSpec

Decoder = Callable[[torch.Tensor], torch.Tensor]  # A sampler's output -> uint8 pixels [N, C, H, W].


@dataclass
class GenerateOptions:
    network: str                        # path or URL of a network pickle or safetensors export
    seeds: list[int]
    outdir: str | None = None           # one PNG per seed, {seed:06d}.png
    subdirs: bool = False               # ... in folders of 1000 seeds: 000000/, 001000/, ...
    grid: str | None = None             # one PNG with all images, in seed order
    class_idx: int | str | None = None  # None: a random class per seed; "balanced": seed mod classes
    max_batch_size: int = 64            # per process
    device: str | None = None           # None: picked automatically
    sampler: SamplerSpec = PaperSampler()  # training.sampling.spec
    fast_paths: dict = field(default_factory=dict)      # training.perf.FastPaths switches; missing = device default
    precision: str | None = None        # 'fp32' | 'bf16' | 'fp16' for the U-Net; None = the network's own
    gnet: str | None = None             # guiding network (path or URL), or 'uncond' for classifier-free guidance
    guidance: float = 1                 # w of D_g + w (D - D_g); 1 = no guidance (the guide is never called)
    guidance_interval: tuple[float, float] | None = None  # guide only for sigma in [lo, hi]


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """Where a seed's image goes: ``outdir/000123.png``, or ``outdir/000000/000123.png`` with subdirs."""
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def seed_batches(seeds: list[int], max_batch_size: int, world_size: int = 1) -> list[list[int]]:
    """Seeds in consecutive batches of at most ``max_batch_size``, their number a multiple of ``world_size``
    so that process r takes batches r, r + world_size, ... and all processes get nearly equal work."""
    num_batches = math.ceil(len(seeds) / (max_batch_size * world_size)) * world_size
    return [part.tolist() for part in np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)]


def _all_gather_objects(obj) -> list:
    if not dist.is_initialized() or distributed.get_world_size() == 1:
        return [obj]
    gathered = [None] * distributed.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class SamplingNetwork(NamedTuple):
    """A snapshot's network in eval mode, and how its samples become pixels."""

    net: torch.nn.Module
    decode: Decoder


def snapshot_decoder(snapshot: dict, source: str, device: torch.device | str) -> Decoder:
    """How the samples of a snapshot's network become uint8 pixels: ``to_uint8`` without an encoder (EDM's and our
    pixel snapshots), else the encoder's ``decode`` (EDM2's, official or ours), its VAE loaded now on ``device`` so
    that a missing one is reported before any sampling."""
    from training.data.encoders import VAEError
    encoder = snapshot.get("encoder")
    if encoder is None:
        return to_uint8
    if isinstance(encoder, UnresolvedObject):
        raise ValueError(f"{source}: its encoder is a '{encoder.class_name}', which this code does not know; "
                         f"cannot turn its samples into images")
    try:
        encoder.init(device)
    except VAEError as e:
        raise ValueError(f"{source}: {e}") from None
    return encoder.decode


def load_sampling_network(network: str, device: torch.device | str | None = None) -> SamplingNetwork:
    """The network of a snapshot (path, URL or official name) to sample images from, in eval mode on ``device``,
    and its decoder (``snapshot_decoder``)."""
    device = device or "cpu"
    snapshot = load_network_pkl(network)
    decode = snapshot_decoder(snapshot, network, device)
    return SamplingNetwork(snapshot["ema"].to(device).eval(), decode)


def load_network_once_per_node(network: str, device: torch.device) -> SamplingNetwork:
    """``load_sampling_network``, rank 0 first (downloading a URL, or a VAE, into the cache), the others then
    reading the cached copy. Every process calls it."""
    if not distributed.is_main():
        distributed.barrier()
    try:
        loaded = load_sampling_network(network, device=device)
    finally:
        if distributed.is_main():
            distributed.barrier()
    return loaded


def load_guide(options: GenerateOptions, net: torch.nn.Module, device: torch.device):
    """The guiding denoiser of ``options.gnet`` (None without one; ``UNCONDITIONAL`` for 'uncond'), with the same
    fast paths as the network, checked to produce images of the network's shape. Every process calls it."""
    if options.gnet is None:
        if options.guidance != 1:
            raise ValueError(f"--guidance={options.guidance:g} needs a guiding network: --gnet=PKL (autoguidance) "
                             f"or --gnet={UNCONDITIONAL} (classifier-free guidance of a network trained with label "
                             f"dropout)")
        return None
    if options.gnet == UNCONDITIONAL:
        if not getattr(net, "label_dim", 0):
            raise ValueError(f"--gnet={UNCONDITIONAL}: {options.network} is unconditional; classifier-free guidance "
                             f"needs a class-conditional network")
        return UNCONDITIONAL
    guide = prepare_for_sampling(load_network_once_per_node(options.gnet, device).net, options, device)
    ours = (net.img_channels, net.img_resolution)
    theirs = (getattr(guide, "img_channels", None), getattr(guide, "img_resolution", None))
    if theirs != ours:
        raise ValueError(f"--gnet={options.gnet}: makes {theirs[0]}-channel {theirs[1]}x{theirs[1]} images, the "
                         f"network {ours[0]}-channel {ours[1]}x{ours[1]}")
    guide_classes, classes = getattr(guide, "label_dim", 0), getattr(net, "label_dim", 0)
    if guide_classes and guide_classes != classes:  # An unconditional guide is EDM2's classifier-free guidance.
        raise ValueError(f"--gnet={options.gnet}: has {guide_classes} classes, the network {classes}; a guide has "
                         f"the network's classes or none")
    return guide


def sampling_denoiser(options: GenerateOptions, net: torch.nn.Module, device: torch.device):
    """The denoiser the samplers get: ``net``, guided by ``options.gnet`` with weight ``options.guidance`` (in
    ``options.guidance_interval``) when asked."""
    return guided(net, load_guide(options, net, device), options.guidance, options.guidance_interval)


def generated_features(net: torch.nn.Module, seeds: list[int], detector, device: torch.device | str,
                       batch_size: int = 64, class_idx: int | str | None = None, sampler: SamplerSpec = PaperSampler(),
                       progress: bool = True, desc: str = "Generating and measuring",
                       decode: Decoder = to_uint8) -> np.ndarray | dict:
    """Detector features [len(seeds), D] float32 of the images ``generate_to_files`` writes for ``seeds`` with
    ``sampler``, made in memory and never written: each image depends only on its seed, so the features are the
    PNGs' for any batch size. Under torchrun each process samples its share of every global batch
    (``metrics.features.compute_features``); all processes return all features.

    ``detector`` may be several (name -> detector, e.g. FID's Inception and FD-DINOv2's ViT): each image is
    sampled once and measured by each, and the result is name -> features. ``decode`` makes the samples pixels
    (``SamplingNetwork.decode``)."""
    def generate(batch_seeds: list[int]) -> torch.Tensor:
        return generate_images(net, batch_seeds, class_idx=class_idx, device=device, decode=decode, sampler=sampler)

    return compute_features(detector, generated_batches(generate, seeds), len(seeds), batch_size, device,
                            progress=progress, desc=desc)


def sampling_rounds(seeds: list[int], max_batch_size: int, world_size: int) -> list[list[list[int]]]:
    """``seed_batches`` grouped into rounds: in round i, process r samples batch r of the round. After its own
    batch of a round the main process counts the whole round's images, so its progress bar shows all processes'
    progress (the processes move in step, each with a nearly equal batch)."""
    batches = seed_batches(seeds, max_batch_size, world_size)
    return [batches[i:i + world_size] for i in range(0, len(batches), world_size)]


def check_options(options: GenerateOptions) -> None:
    """Raise ValueError naming the option for inputs that cannot work, before any work starts."""
    if not options.outdir and not options.grid:
        raise ValueError("nothing to write: give --outdir and/or --grid")
    if not options.seeds:
        raise ValueError("--seeds: no seeds given")
    if min(options.seeds) < 0:
        raise ValueError(f"--seeds: seeds must be non-negative, got {min(options.seeds)}")
    if options.max_batch_size < 1:
        raise ValueError(f"--batch={options.max_batch_size}: must be at least 1")


def check_network_options(net, options: GenerateOptions) -> None:
    label_dim = getattr(net, "label_dim", 0)
    if options.class_idx is not None and not label_dim:
        raise ValueError(f"--class={options.class_idx}: {options.network} is unconditional; leave out --class")
    if isinstance(options.class_idx, int) and not 0 <= options.class_idx < label_dim:
        raise ValueError(f"--class={options.class_idx}: {options.network} has classes 0..{label_dim - 1}")


def prepare_for_sampling(net: torch.nn.Module, options: GenerateOptions, device: torch.device) -> torch.nn.Module:
    """The network with the fast paths of ``options`` (the device's defaults for those not given)."""
    fast = default_fast_paths(device, net).with_options(**options.fast_paths)
    if options.precision is not None:
        fast = fast.with_options(precision=options.precision)
    apply_process_settings(fast)
    return maybe_compile(prepare_network(net, fast, precision=options.precision is not None), fast)


def generate_to_files(options: GenerateOptions) -> dict:
    """Sample one image per seed and write the PNGs (and the grid). Works alone or under torchrun.
    Returns a summary: number of images, seconds, and the sampler that was used."""
    check_options(options)
    try:
        device = distributed.init(options.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    try:
        check_precision(options.precision, device)
    except ValueError as e:
        raise ValueError(f"--precision={options.precision}: {e}") from None
    net, decode = load_network_once_per_node(options.network, device)
    check_network_options(net, options)
    net = sampling_denoiser(options, prepare_for_sampling(net, options, device), device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    rounds = sampling_rounds(options.seeds, options.max_batch_size, world_size)

    start = time.time()
    kept = []  # (seeds, images) for the grid
    with tqdm(total=len(options.seeds), unit="img", desc="Generating", disable=not distributed.is_main()) as bar:
        for round_batches in rounds:
            batch = round_batches[rank]
            if not batch:
                continue
            images = generate_images(net, batch, class_idx=options.class_idx, device=device, decode=decode,
                                     sampler=options.sampler).cpu()
            if options.outdir:
                for seed, image in zip(batch, images):
                    save_png(image_path(options.outdir, seed, options.subdirs), image)
            if options.grid:
                kept.append((batch, images))
            bar.update(sum(map(len, round_batches)))
    if options.grid:
        by_seed = {}
        for part in _all_gather_objects(kept):
            for batch, images in part:
                by_seed.update(zip(batch, images))
        if distributed.is_main():
            save_png(options.grid, image_grid(torch.stack([by_seed[seed] for seed in options.seeds])))
    distributed.barrier()
    return dict(num_images=len(options.seeds), seconds=time.time() - start, sampler=options.sampler.describe(),
                world_size=world_size,
                device=str(device))
