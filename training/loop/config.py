"""The training loop's hyperparameters as one typed config, and the checks that options fit together."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.sampling.time_steps import DEFAULT_NUM_STEPS


class TrainingConfigError(ValueError):
    """Options that cannot work together (e.g. a network that does not fit the dataset); one clear line."""


@dataclass
class TrainingConfig:
    """Everything ``training_loop`` needs, by the official release's keyword names (what train.py writes to
    ``training_options.json``). The ``*_kwargs`` dicts name a class (``class_name``) and its arguments."""

    run_dir: str = "."                  # Output directory (the run directory).
    dataset_kwargs: dict = field(default_factory=dict)      # training.data.dataset.ImageFolderDataset options.
    data_loader_kwargs: dict = field(default_factory=dict)  # torch.utils.data.DataLoader options.
    network_kwargs: dict = field(default_factory=dict)      # Preconditioner and U-Net options.
    loss_kwargs: dict = field(default_factory=dict)         # Loss options (training.loss.*).
    optimizer_kwargs: dict = field(default_factory=dict)    # Optimizer options (class_name, lr, betas, eps).
    augment_kwargs: dict | None = None  # AugmentPipe options; None = no augmentation.
    seed: int = 0                       # Run seed (each rank derives its own).
    batch_size: int = 512               # Global batch, in images per optimizer step.
    batch_gpu: int | None = None        # Images per forward pass per process (gradient accumulation).
    total_kimg: float = 200000          # Training duration, thousands of images.
    ema_halflife_kimg: float = 500      # EMA half-life, thousands of images.
    ema_rampup_ratio: float | None = 0.05  # EMA half-life ramp-up ratio; None = no ramp-up.
    lr_rampup_kimg: float = 10000       # Learning-rate ramp-up, thousands of images.
    loss_scaling: float = 1             # Loss scaling (against fp16 underflow).
    kimg_per_tick: float = 50           # Thousands of images per tick (log line, stats).
    snapshot_ticks: int | None = 50     # Ticks between network snapshots; None = never.
    state_dump_ticks: int | None = 500  # Ticks between training states; None = never.
    resume_pkl: str | None = None       # Start from this snapshot's EMA weights (--transfer).
    resume_state_dump: str | None = None  # Continue exactly from this training state (--resume).
    cudnn_benchmark: bool = True        # torch.backends.cudnn.benchmark.
    device: str | torch.device | None = None  # None = pick automatically.
    grid_images: int = 64               # Images in each sample grid; 0 = no grids.
    grid_steps: int = DEFAULT_NUM_STEPS  # Sampler steps for the grids.
    tensorboard: bool = True            # TensorBoard scalars when the package is installed.
    fast_paths: dict | None = None      # training.perf.FastPaths switches; None or missing = the device's defaults.
    max_minutes: float | None = None    # Also end (with a final snapshot) after this much wall-clock time.
    lr_decay_batches: float = 0         # EDM2: lr / sqrt(max(steps / this, 1)) after the ramp-up; 0 = constant.
    lr_cooldown: float = 0              # Fraction of total_kimg at the end over which lr falls linearly to 0.
    ema_stds: list[float] | None = None  # EDM2: sigma_rel of the power-function EMAs to track; None = none.
    label_dropout: float = 0            # Probability of training an image without its label (for guidance).
    metrics_kwargs: dict | None = None  # training.loop.monitor.MetricsOptions: FID/KID during training; None = off.
    encoder_kwargs: dict | None = None  # training.data.encoders: raw latents -> the network's; None = pixels.
    teacher_kwargs: dict | None = None  # Consistency distillation: teacher (pickle), guide (pickle or 'uncond'),
    # guidance (w); attached to the loss (ConsistencyLoss.teacher). None = no teacher.

    def __post_init__(self):
        self.ema_stds = list(self.ema_stds or [])

    @property
    def total_nimg(self) -> int:
        return int(round(self.total_kimg * 1000))


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
