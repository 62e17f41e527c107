"""What train.py's names stand for: the architectures, Table 1's preconditioners and losses, the defaults per
architecture, the official EDM2 presets, and Easy Consistency Tuning's published recipes (``CT_RECIPES``). Tables of
values in the command line's units (durations in Mimg, EMA half-lives in Mimg, stages in kimg); train.py fills in
whatever a run's options leave out from them."""

from __future__ import annotations

import math

ARCHITECTURES = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
    # EDM2's magnitude-preserving U-Net (config G) with its own preconditioner and loss (see EDM2 below).
    "edm2": dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8]),
}
PRECONDITIONERS = {  # --precond: (network, loss), Table 1.
    "vp": ("training.networks.VPPrecond", "training.loss.VPLoss"),
    "ve": ("training.networks.VEPrecond", "training.loss.VELoss"),
    "edm": ("training.networks.EDMPrecond", "training.loss.EDMLoss"),
}
EDM2_NETWORK, EDM2_LOSS = "training.networks.edm2.Precond", "training.loss.EDM2Loss"
# --consistency: ECT's loss (training/loss.py ConsistencyLoss), its p(t) (Geng et al. 2024, CIFAR-10), and the gap
# t - r halved CT_STAGES times over --duration unless --ct-stage says how often.
CONSISTENCY_LOSS = "training.loss.ConsistencyLoss"
CONSISTENCY_DEFAULTS = dict(p_mean=-1.1, p_std=2.0, ct_q=2, ct_k=8, ct_b=1, ct_huber=0, ct_weight="ect")
CT_STAGES = 4  # Stages over --duration when --ct-stage is not given (measured against 8: docs/consistency.md).

# Defaults of the options that depend on the architecture: EDM's (Table 2, config F) and EDM2's (its img64
# presets: P_mean, P_std, lr, decay; Adam's beta2 of its Appendix D.2; no augmentation or dropout; one
# power-function EMA per sigma_rel).
EDM_DEFAULTS = dict(duration=200, batch=512, lr=10e-4, lr_rampup=10000, lr_decay=0, adam_beta2=0.999, dropout=0.13,
                    augment=0.12, ema=0.5, optimizer="adam")
EDM2_DEFAULTS = dict(duration=1024 * 2 ** 20 / 1e6, batch=2048, lr=0.0100, lr_rampup=10000, lr_decay=35000,
                     adam_beta2=0.99, dropout=0, augment=0, p_mean=-0.8, p_std=1.6, ema_std=[0.050, 0.100], ema=0.5,
                     optimizer="adam")
OPTIMIZERS = {"adam": "torch.optim.Adam", "radam": "torch.optim.RAdam"}  # --optimizer (ECT's CIFAR-10 recipe: RAdam).


def _edm2_preset(mebi_images: int, channels: int, lr: float, decay: int, dropout: float, p_mean: float,
                 p_std: float) -> dict:
    return dict(arch="edm2", duration=(mebi_images << 20) / 1e6, batch=2048, cbase=channels, lr=lr, lr_decay=decay,
                dropout=dropout, p_mean=p_mean, p_std=p_std)


# The official EDM2 presets (train_edm2.py of the EDM2 release): duration in Mi images, channels, ref. lr, decay
# (batches), dropout, P_mean, P_std. The img512 ones train on Stable Diffusion VAE latents.
PRESETS = {
    **{f"edm2-img512-{size}": _edm2_preset(mi, ch, lr, 70000, dropout, -0.4, 1.0) for size, mi, ch, lr, dropout in (
        ("xxs", 2048, 64, 0.0170, 0.00), ("xs", 2048, 128, 0.0120, 0.00), ("s", 2048, 192, 0.0100, 0.00),
        ("m", 2048, 256, 0.0090, 0.10), ("l", 1792, 320, 0.0080, 0.10), ("xl", 1280, 384, 0.0070, 0.10),
        ("xxl", 896, 448, 0.0065, 0.10))},
    **{f"edm2-img64-{size}": _edm2_preset(mi, ch, lr, 35000, dropout, -0.8, 1.6) for size, mi, ch, lr, dropout in (
        ("xs", 1024, 128, 0.0120, 0.00), ("s", 1024, 192, 0.0100, 0.00), ("m", 2048, 256, 0.0090, 0.10),
        ("l", 1024, 320, 0.0080, 0.10), ("xl", 640, 384, 0.0070, 0.10))},
}
LATENT_PRESETS = tuple(name for name in PRESETS if name.startswith("edm2-img512-"))


def ema_halflife_mimg(beta: float, batch: int) -> float:
    """The EMA half-life, in Mimg, of an EMA that keeps ``beta`` of itself per optimizer step of ``batch`` images
    (ECT's ``--ema_beta``): beta^steps = 1/2."""
    return math.log(0.5) / math.log(beta) * batch / 1e6


# Easy Consistency Tuning's recipes (Geng et al. 2024; locuslab/ect: run_ecm.sh and run_ecm_1hour.sh on CIFAR-10,
# its imgnet branch's run_imgnet_ecm.sh with ct_train.py's edm2-img64-s preset), in train.py's options. ECT's ticks
# between stages (--double) times its tick become ct_stage; its per-step EMA beta becomes a half-life. ct_sigmas are
# the levels of its 2-step sampler (sigma_max, its mid_t, sigma_min), used by the run's grids and metrics.
_ECT_CIFAR = dict(consistency=True, duration=25.6, batch=128, lr=1e-4, optimizer="radam", adam_beta2=0.999,
                  lr_rampup=0, lr_decay=0, dropout=0.2, augment=0, ema=ema_halflife_mimg(0.9999, 128),
                  p_mean=-1.1, p_std=2.0, ct_q=2, ct_k=8, ct_b=1, ct_huber=0, ct_weight="ect", ct_stage=3200,
                  ct_sigmas=[80, 0.821, 0.002])
CT_RECIPES = {
    # 200k steps of batch 128 from EDM's unconditional CIFAR-10 VP network, the gap halving every 25k steps: 2-step
    # FID 2.11 after 400k steps (ECT's table).
    "ect-cifar": _ECT_CIFAR,
    # One stage with the gap t n(t) / 256 from the start, about 8k steps (one A100-hour): 2-step FID 2.73.
    "ect-1hour": {**_ECT_CIFAR, "duration": 1.024, "ct_q": 256, "ct_stage": 1024,
                  "ema": ema_halflife_mimg(0.9993, 128)},
    # ECM-S from EDM2-S on ImageNet-64: Adam at 1e-3 with EDM2's inverse-square-root decay after 2000 steps, EDM's
    # weighting, pseudo-Huber c = 0.06, dropout 0.4 at 16x16 and below, 4 stages at q = 4 over 100k steps of batch
    # 128: 2-step FID 3.18 against the teacher's 1.58.
    "ect-edm2": dict(consistency=True, duration=12.8, batch=128, lr=1e-3, optimizer="adam", adam_beta2=0.99,
                     lr_rampup=0, lr_decay=2000, dropout=0.4, dropout_res=16, augment=0,
                     ema=ema_halflife_mimg(0.9999, 128), p_mean=-0.8, p_std=1.6, ct_q=4, ct_k=8, ct_b=1,
                     ct_huber=0.06, ct_weight="edm", ct_stage=3200, ct_sigmas=[80, 1.526, 0.002]),
}
