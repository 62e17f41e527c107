"""The paper's training configurations A-F (Table 2, with the hyperparameters of Appendix F's Table 7) and the sizes
of the miniature, mapped onto this repository's ``train.py`` options.

``TABLE2`` holds the paper's own values, at CIFAR-10 scale; ``train_options`` shrinks the absolute sizes for a
``Size`` (channels, blocks, images, batch) and keeps every *difference* between the configs the paper's:

- batch: the paper's batch times ``Size.batch_scale`` (128 : 512 stays 1 : 4);
- learning rate, dropout, augmentation probability, channel multipliers per resolution: the paper's values;
- learning-rate ramp-up and EMA half-life: the same fraction of the training duration as in the paper (e.g. 10
  Mimg of 200 Mimg is 5% of the run), so the schedules have the paper's shape over a shorter run;
- the duration: ``Size.kimg`` for every config (the paper trains every config for 200 Mimg).

The data is Fashion-MNIST padded to 32x32, as the official dataset tool pads it, so the U-Net has CIFAR-10's levels
32, 16, 8 and 4 and config C's change applies as in the paper (at the native 28x28 the U-Net can halve only twice,
28 -> 14 -> 7, and there would be no 4x4 level to remove).
"""

from __future__ import annotations

import dataclasses
from typing import Any

PAPER_DURATION_MIMG = 200  # Table 7: every CIFAR-10 config trains for 200 Mimg.
PAPER_CHANNELS = 128       # Table 7: channel multiplier (model_channels) of DDPM++ for CIFAR-10.
PAPER_BLOCKS = 4           # Residual blocks per resolution of DDPM++ (Song et al.), kept by EDM.
ATTENTION_RESOLUTIONS = (16,)  # DDPM++ has self-attention at 16x16, in every config.


@dataclasses.dataclass(frozen=True)
class PaperConfig:
    """One row of Table 2 with its hyperparameters from Table 7 (CIFAR-10, the VP column)."""
    title: str                  # Table 2's row label.
    precond: str                # Preconditioning (Table 1 column): 'vp' | 'edm'.
    loss: str                   # p_train(sigma) and lambda(sigma) (Table 1 column): 'vp' | 'edm'.
    batch: int                  # Minibatch size.
    lr: float                   # Adam learning rate.
    lr_rampup_mimg: float       # Learning-rate ramp-up, Mimg.
    ema_mimg: float             # EMA half-life, Mimg.
    dropout: float              # Dropout probability.
    channel_mult: tuple[int, ...]  # Channels per resolution, 32x32 first.
    augment: float              # Non-leaking augmentation probability (0 = off).
    gradient_clipping: bool     # Song et al.'s clipping; not in this training loop (see docs/paper-miniature.md).


# Table 2, rows A-F, with Table 7's hyperparameters (CIFAR-10 at 32x32, VP):
#   A  Baseline (Song et al.'s DDPM++ cont. VP): VP precond and loss; batch 128, lr 2e-4 ramped over 0.64 Mimg,
#      EMA half-life 0.89 Mimg (0.9999 per step of 128), dropout 10%, channels per resolution 1-2-2-2, gradient
#      clipping, no augmentation.
#   B  + Adjust hyperparameters: batch 512, lr 10e-4 ramped over 10 Mimg, EMA half-life 0.5 Mimg, dropout 13%,
#      no gradient clipping.
#   C  + Redistribute capacity: channels per resolution 2-2-2 (the 4x4 level removed, the 32x32 level doubled).
#   D  + Our preconditioning: EDM's c_skip, c_out, c_in, c_noise (Table 1), still the VP loss.
#   E  + Our loss function: EDM's p_train (ln sigma ~ N(-1.2, 1.2^2)) and lambda(sigma).
#   F  + Non-leaking augmentation: probability 12%.
_A = PaperConfig(title="Baseline (VP)", precond="vp", loss="vp", batch=128, lr=2e-4, lr_rampup_mimg=0.64,
                 ema_mimg=0.89, dropout=0.10, channel_mult=(1, 2, 2, 2), augment=0, gradient_clipping=True)
_B = dataclasses.replace(_A, title="+ Adjust hyperparameters", batch=512, lr=10e-4, lr_rampup_mimg=10, ema_mimg=0.5,
                         dropout=0.13, gradient_clipping=False)
_C = dataclasses.replace(_B, title="+ Redistribute capacity", channel_mult=(2, 2, 2))
_D = dataclasses.replace(_C, title="+ Our preconditioning", precond="edm")
_E = dataclasses.replace(_D, title="+ Our loss function", loss="edm")
_F = dataclasses.replace(_E, title="+ Non-leaking augmentation", augment=0.12)
TABLE2: dict[str, PaperConfig] = {"A": _A, "B": _B, "C": _C, "D": _D, "E": _E, "F": _F}

# Table 2, CIFAR-10 32x32, deterministic sampler at NFE 35 (FID of 50k images, minimum of three).
PAPER_FID = {
    "unconditional VP": {"A": 3.01, "B": 2.51, "C": 2.31, "D": 2.29, "E": 2.05, "F": 1.97},
    "conditional VP": {"A": 2.48, "B": 2.18, "C": 2.08, "D": 2.09, "E": 1.88, "F": 1.79},
}
PAPER_NFE = 35  # Table 2's deterministic sampler for CIFAR-10: 18 Heun steps.

LOSS_CLASSES = {"vp": "training.loss.VPLoss", "edm": "training.loss.EDMLoss"}


@dataclasses.dataclass(frozen=True)
class Size:
    """How big each experiment is; the configs' differences do not depend on it."""
    name: str
    kimg: float                   # Training images per (config, seed), thousands: the same for every config, a
                                  # whole number of every config's batches.
    seeds: tuple[int, ...]        # Training seeds per config.
    batch_scale: float            # Multiplies Table 7's batch (128 for A, 512 for B-F).
    cbase: int                    # model_channels (the paper's 128).
    blocks: int                   # Residual blocks per resolution (the paper's 4).
    train_images: int             # The first images of the embedded 10,000; the rest is held out.
    num_ref: int                  # Held-out real images in the reference statistics.
    table2_samples: int           # Generated images per Table 2 network (seeds 0..N-1).
    table2_steps: int             # Heun steps of Table 2's deterministic sampler (18 = the paper's NFE 35).
    fig2_samples: int             # Generated images per Figure 2 point.
    fig2_euler_steps: tuple[int, ...]  # Steps of the original (Euler) sampler: NFE = steps.
    fig2_heun_steps: tuple[int, ...]   # Steps of the Heun samplers: NFE = 2 steps - 1.
    fig5b_samples: int            # Generated images per Figure 5b point.
    fig5b_steps: int              # Heun steps of Algorithm 2.
    fig5b_churn: tuple[float, ...] # S_churn values. Algorithm 2's gamma_i = min(S_churn / steps, sqrt(2) - 1)
                                   # stops growing at S_churn = 0.414 steps (7.5 at 18 steps): one value past it.
    batch: int = 100              # Sampling and detector batch.
    tick_kimg: float = 1          # Training status line every this many kimg (log.txt).

    def batch_of(self, config: PaperConfig) -> int:
        return max(1, round(config.batch * self.batch_scale))


SIZES: dict[str, Size] = {
    # Every stage at toy size, for CI (a few minutes; most of it is the 2048-dimensional FID of each piece).
    "smoke": Size(name="smoke", kimg=0.032, seeds=(0,), batch_scale=1 / 32, cbase=4, blocks=1, train_images=256,
                  num_ref=32, table2_samples=16, table2_steps=4, fig2_samples=16, fig2_euler_steps=(2, 4),
                  fig2_heun_steps=(2,), fig5b_samples=16, fig5b_steps=3, fig5b_churn=(0, 40), batch=16,
                  tick_kimg=0.016),
    # About two hours on two CPU cores, one thread (docs/paper-miniature.md: the measured pieces behind it).
    "cpu": Size(name="cpu", kimg=6.4, seeds=(0, 1, 2), batch_scale=1 / 16, cbase=16, blocks=1, train_images=5000,
                num_ref=1000, table2_samples=200, table2_steps=18, fig2_samples=100,
                fig2_euler_steps=(8, 16, 32, 64, 128), fig2_heun_steps=(3, 5, 9, 18, 32), fig5b_samples=200,
                fig5b_steps=18, fig5b_churn=(0, 1, 2, 4, 6, 10)),
    # One modern GPU, about an hour (estimated from the quickstart's GPU rates, not measured).
    "gpu": Size(name="gpu", kimg=128, seeds=(0, 1, 2), batch_scale=1 / 4, cbase=64, blocks=2, train_images=5000,
                num_ref=5000, table2_samples=5000, table2_steps=18, fig2_samples=2000,
                fig2_euler_steps=(8, 16, 32, 64, 128, 256, 512), fig2_heun_steps=(3, 5, 9, 18, 32, 64),
                fig5b_samples=5000, fig5b_steps=18, fig5b_churn=(0, 1, 2, 4, 6, 10), batch=500, tick_kimg=10),
}


def check_config(name: str) -> PaperConfig:
    if name not in TABLE2:
        raise ValueError(f"config '{name}': expected one of {', '.join(TABLE2)} (Table 2's rows)")
    return TABLE2[name]


def check_size(name: str) -> Size:
    if name not in SIZES:
        raise ValueError(f"size '{name}': expected one of {', '.join(SIZES)}")
    return SIZES[name]


def with_training_length(size: Size, kimg: float) -> Size:
    """``size`` with every config trained on ``kimg`` thousand images instead: the schedules (ramp-up, EMA) keep
    their share of the run, as they do at the size's own length. Refused unless every config's batch divides it."""
    images = kimg * 1000
    batches = sorted({size.batch_of(config) for config in TABLE2.values()})
    if kimg <= 0 or images != round(images) or any(round(images) % batch for batch in batches):
        raise ValueError(f"--kimg={kimg:g}: expected a positive number of images that every config's batch "
                         f"({', '.join(map(str, batches))} at size '{size.name}') divides")
    return dataclasses.replace(size, name=f"{size.name}-{kimg:g}kimg", kimg=kimg)


def fraction_of_run(mimg: float) -> float:
    """A duration of the paper's schedule as a fraction of its 200-Mimg run."""
    return mimg / PAPER_DURATION_MIMG


def train_options(name: str, size: Size, seed: int) -> dict[str, Any]:
    """The miniature's training options of config ``name`` (train.py's option names, duration in Mimg as there),
    plus ``loss``, which train.py cannot set apart from --precond (config D needs EDM preconditioning with the VP
    loss)."""
    config = check_config(name)
    return dict(
        precond=config.precond, loss=config.loss, arch="ddpmpp", cond=False, cbase=size.cbase,
        cres=list(config.channel_mult), blocks=size.blocks, attn=list(ATTENTION_RESOLUTIONS),
        batch=size.batch_of(config), lr=config.lr, lr_rampup=fraction_of_run(config.lr_rampup_mimg) * size.kimg,
        ema=fraction_of_run(config.ema_mimg) * size.kimg / 1000, dropout=config.dropout, augment=config.augment,
        xflip=False, duration=size.kimg / 1000, seed=seed)


def train_args(options: dict[str, Any]) -> list[str]:
    """``train_options`` as train.py command-line options (all but ``loss``, which --precond implies there)."""
    def value(v):
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        if isinstance(v, float):
            short = f"{v:g}"
            return short if float(short) == v else repr(v)
        return str(v)

    return [f"--{key.replace('_', '-')}={value(v)}" for key, v in options.items() if key != "loss"]
