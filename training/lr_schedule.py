"""Learning-rate schedules.

EDM2 (Karras et al., CVPR 2024, Section 2, "learning rate decay") trains with Adam at a rate that falls as the
inverse square root of the step count once past a reference count, after a linear ramp-up over the first images.
EDM's constant rate with a ramp-up is ``training.training_loop.learning_rate``.
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
