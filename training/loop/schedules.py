"""What changes with the images seen: the learning rate and the EMA's decay.

EDM (Section 5, Appendix F) ramps the learning rate up linearly over the first images, then keeps it; EDM2 (Karras et
al., CVPR 2024, Section 2, "learning rate decay") lets it fall as the inverse square root of the step count once past
a reference count. Either may end with a cooldown, a linear fall to zero over the last part of a run of known length
(the "decay" of a warmup-stable-decay schedule; Hagele et al., "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations", NeurIPS 2024). The traditional EMA's half-life ramps up with the images seen (EDM's
``ema_rampup_ratio``); EDM2's power-function EMAs are ``training.ema.phema``'s.
"""

from __future__ import annotations


def learning_rate(base_lr: float, cur_nimg: int, lr_rampup_kimg: float, batch_size: int = 1,
                  lr_decay_batches: float = 0, total_nimg: int = 0, lr_cooldown: float = 0) -> float:
    """EDM: linear ramp-up from 0 to ``base_lr`` over the first ``lr_rampup_kimg`` thousand images, then constant.
    With ``lr_decay_batches`` > 0, EDM2's schedule (``edm2_learning_rate``, its Section 2, Eq. 69 of the arXiv
    version). With ``lr_cooldown`` > 0, either falls linearly to 0 over that fraction of the run's ``total_nimg``
    images at its end (``cooldown_factor``)."""
    if lr_decay_batches > 0:
        lr = edm2_learning_rate(cur_nimg, batch_size, ref_lr=base_lr, ref_batches=lr_decay_batches,
                                rampup_Mimg=lr_rampup_kimg / 1000)
    else:
        lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
    return lr * cooldown_factor(cur_nimg, total_nimg, lr_cooldown)


def edm2_learning_rate(cur_nimg: float, batch_size: int, ref_lr: float, ref_batches: float,
                       rampup_Mimg: float) -> float:
    """alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)), t = cur_nimg / batch_size steps, alpha_ref = ``ref_lr``,
    t_ref = ``ref_batches`` (0: no decay); times min(cur_nimg / (rampup_Mimg * 1e6), 1) during the ramp-up
    (``rampup_Mimg`` = 0: none)."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= max(cur_nimg / (batch_size * ref_batches), 1) ** 0.5
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


def cooldown_factor(cur_nimg: float, total_nimg: float, fraction: float) -> float:
    """The cooldown's multiplier: 1 until the last ``fraction`` of a ``total_nimg``-image run, then falling
    linearly to 0 at ``total_nimg`` (and 0 past it); ``fraction`` = 0: always 1."""
    if fraction <= 0 or total_nimg <= 0:
        return 1.0
    return min(max((total_nimg - cur_nimg) / (fraction * total_nimg), 0.0), 1.0)


def ema_halflife_nimg(cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None) -> float:
    """The EMA's half-life in images at ``cur_nimg``: ``ema_halflife_kimg`` thousand, or during the ramp-up at most
    ``ema_rampup_ratio`` times the images seen so far."""
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return halflife_nimg


def ema_beta(cur_nimg: int, batch_size: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None) -> float:
    """Per-step EMA decay for the half-life of ``ema_halflife_nimg``: 0.5^(batch / half-life)."""
    return 0.5 ** (batch_size / max(ema_halflife_nimg(cur_nimg, ema_halflife_kimg, ema_rampup_ratio), 1e-8))
