"""Learning-rate schedules.

EDM2 (Karras et al., CVPR 2024, Section 2, "learning rate decay") trains with Adam at a rate that falls as the
inverse square root of the step count once past a reference count, after a linear ramp-up over the first images.
EDM's constant rate with a ramp-up is ``training.training_loop.learning_rate``. Either may end with a cooldown, a
linear fall to zero over the last part of a run of known length (the "decay" of a warmup-stable-decay schedule;
Hagele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", NeurIPS 2024). On
the quickstart's recipe it measured no gain at 80 kimg (docs/quickstart-notes.md).
"""

from __future__ import annotations


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
