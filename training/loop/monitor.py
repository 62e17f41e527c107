"""What a run measures while it trains, besides the loss itself:

- the loss by noise level: the training loss averaged in fixed buckets of ln(sigma), the view of EDM's Fig. 5
  and EDM2's Fig. 5 (where in sigma the network still has something to learn), reported each tick;
- FID/KID/FD-DINOv2 of the EMA networks (and of each power-function EMA of EDM2, Section 3.1), sampled in memory
  with fid.py's sharded generator for fixed seeds 0..N-1 (each image once for all the metrics), against the
  training dataset's cached statistics.

The losses of training/loss.py draw sigma themselves and keep the official call ``loss_fn(net, images, labels,
augment_pipe)``; the loop learns each image's sigma from the network call (``SigmaRecorder``), so neither the
losses nor the snapshots they travel in change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from torch_utils import distributed as dist
from training.loss import ConsistencyLoss
from training.sampling.spec import NamedSampler, PaperSampler, SamplerSpec
from training.sampling.time_steps import DEFAULT_NUM_STEPS

# Bucket edges of sigma: EDM's sampling range 0.002..80 (Section 5), finer where p_train puts its mass. A sigma
# below the first edge counts in the first bucket, one above the last (VE draws up to 100) in the last.
SIGMA_EDGES = (0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


def sigma_bucket_names(edges: Sequence[float] = SIGMA_EDGES) -> list[str]:
    """Stat names of the buckets: ``Loss/sigma_0.002-0.01``, ..., ``Loss/sigma_20-80``."""
    return [f"Loss/sigma_{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]


class SigmaRecorder:
    """The network as the loss sees it, remembering the sigma of its latest call (the denoiser interface is
    ``net(x, sigma, labels, ...)``). Everything else is the wrapped network's."""

    def __init__(self, net):
        self.net = net
        self.sigma: torch.Tensor | None = None

    def __call__(self, x, sigma, *args, **kwargs):
        self.sigma = sigma
        return self.net(x, sigma, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


class LossBySigma:
    """Sums of the per-image loss in buckets of sigma, made on the device without waiting for it: each image's
    bucket by ``torch.bucketize``, the sums by a comparison matrix (no boolean-mask indexing, whose output size
    the host would have to read)."""

    def __init__(self, device: torch.device, edges: Sequence[float] = SIGMA_EDGES):
        self.names = sigma_bucket_names(edges)
        self.inner_edges = torch.tensor(edges[1:-1], dtype=torch.float64, device=device)
        self.bucket_ids = torch.arange(len(self.names), device=device)

    def moments(self, sigma: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """[buckets, 3]: (images, sum, sum of squares) of the per-image mean loss, for sigma [N] or [N, 1, 1, 1]
        and the per-pixel loss [N, ...]."""
        per_image = loss.detach().flatten(1).to(torch.float64).mean(1)
        sigma = sigma.detach().to(torch.float64).flatten().expand(per_image.shape[0])
        index = torch.bucketize(sigma, self.inner_edges, right=True)
        one_hot = (index[:, None] == self.bucket_ids[None, :]).to(torch.float64)
        values = torch.stack([torch.ones_like(per_image), per_image, per_image.square()], dim=1)
        return one_hot.T @ values

    def report(self, stats, sigma: torch.Tensor | None, loss: torch.Tensor) -> None:
        """Add one batch to the tick's statistics; nothing when the loss never called the network with one sigma
        per image (or one for all)."""
        if sigma is None or not isinstance(sigma, torch.Tensor) or sigma.numel() not in (1, loss.shape[0]):
            return
        for name, row in zip(self.names, self.moments(sigma, loss)):
            stats.report_moments(name, row)


# ----------------------------------------------------------------------------
# FID/KID/FD-DINOv2 during training.

@dataclass
class MetricsOptions:
    """``train.py --metrics ...``: what to measure, on how many samples, how often."""

    metrics: list[str]                   # 'fid', 'kid', 'fd_dinov2'.
    num_images: int = 10000              # Seeds 0..num_images-1, the same at every evaluation.
    every_ticks: int | None = None       # None = with each network snapshot.
    num_steps: int = DEFAULT_NUM_STEPS   # EDM sampler steps (its default: Heun, Eq. 5, rho = 7).
    batch: int = 64                      # Images per batch per process.
    detector: str | None = None          # FID Inception weights; None = metrics.detector's default.
    dinov2: str | None = None            # DINOv2 ViT-L/14 weights (fd_dinov2); None = the official release's URL.
    ref: str | None = None               # Reference: statistics (fid.py ref) or an image dataset; None = the
                                         # training dataset (of images: latents need the images' reference).


CONSISTENCY_SAMPLER = NamedSampler("consistency", nfe=2)  # What the grids and metrics of a consistency model use.


def monitoring_sampler(loss_fn, num_steps: int) -> SamplerSpec:
    """How the training loop's grids and metrics sample the network that ``loss_fn`` trains: a consistency model with
    its own sampler at the loss's ``sample_sigmas`` (by default two calls), a denoiser with the paper's Heun on
    ``num_steps`` steps."""
    if not isinstance(loss_fn, ConsistencyLoss):
        return PaperSampler(num_steps=num_steps)
    if loss_fn.sample_sigmas:
        return NamedSampler("consistency", nfe=len(loss_fn.sample_sigmas) - 1, sigmas=tuple(loss_fn.sample_sigmas))
    return CONSISTENCY_SAMPLER


def network_label(sigma_rel: float | None = None) -> str:
    """'ema' for the EMA of the training loop, 'ema-0.050' for a power-function EMA with that sigma_rel."""
    return "ema" if sigma_rel is None else f"ema-{sigma_rel:.3f}"


class InTrainingMetrics:
    """Loads the detectors and the dataset's reference statistics once (every process calls this), then
    evaluates networks in memory. The reference is shared with ``fid.py calc --ref=DATASET`` (same cache keys)."""

    def __init__(self, options: MetricsOptions, data_path: str, device: torch.device, log=None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, sampler: SamplerSpec | None = None):
        from metrics.evaluate import check_reference_for, load_detectors, parse_metrics
        from metrics.reference import is_statistics_file, load_reference
        from training.sampling.sample import to_uint8

        self.options = options
        self.metrics = parse_metrics(options.metrics)
        self.device = device
        self.decode = decode or to_uint8  # The network's samples -> pixels.
        self.sampler = sampler or PaperSampler(num_steps=options.num_steps)  # EDM's Heun by default.
        ref_path = options.ref or data_path
        statistics = load_reference(ref_path) if is_statistics_file(ref_path) else None
        if statistics is not None:
            check_reference_for(statistics, self.metrics)
        self.detectors = load_detectors(self.metrics, device, inception=options.detector, dinov2=options.dinov2)
        self.ref = statistics if statistics is not None else dataset_reference(
            ref_path, self.detectors, device, options.batch, keep_features="kid" in self.metrics)
        self.latest: dict[str, float] = {}  # metric -> value of the latest evaluation of 'ema'.

    def due(self, tick: int, done: bool, snapshot: bool) -> bool:
        every = self.options.every_ticks
        return snapshot if every is None else done or tick % every == 0

    @torch.no_grad()
    def evaluate(self, networks: dict[str, torch.nn.Module], kimg: float) -> list[dict]:
        """One record per (network, metric): kimg, metric, value, network, num_images, seconds."""
        from metrics.evaluate import compute_metrics
        from training.sampling.generation import generated_features

        seeds = list(range(self.options.num_images))
        records = []
        for label, net in networks.items():
            start = time.time()
            features = generated_features(net, seeds, self.detectors, self.device, self.options.batch,
                                          sampler=self.sampler, progress=False, decode=self.decode)
            values = compute_metrics(features, self.ref, self.metrics)
            seconds = time.time() - start
            records += [dict(kimg=kimg, metric=name, value=value, network=label, num_images=len(seeds),
                             seconds=seconds) for name, value in values.items()]
            if label == network_label():
                self.latest.update(values)
        return records


def dataset_reference(data_path: str, detectors: dict, device: torch.device, batch: int, keep_features: bool) -> dict:
    """Statistics of every image of the dataset at ``data_path`` (no x-flips, no subset) for each detector (name ->
    detector), as ``fid.py`` computes them for ``--ref=DATASET``, read from the cache when there."""
    from metrics.evaluate import cached_dataset_references
    from metrics.features import compute_features, dataset_batches
    from training.data.dataset import open_image_dataset

    def features(missing: dict) -> dict:
        dataset = open_image_dataset(data_path)
        dist.print0(f"Computing the reference statistics of {dataset.name} ({len(dataset)} images) for the metrics")
        return compute_features(missing, dataset_batches(dataset, 0), len(dataset), batch, device,
                                desc=f"Features of {dataset.name}")

    return cached_dataset_references(data_path, detectors, features, keep_features=keep_features)
