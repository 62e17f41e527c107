"""Networks of the paper: the raw U-Nets F and the preconditioners D of Table 1 / Eq. 7.

Official configs name these classes as ``training.networks.<Class>``; that path keeps working here.
"""

from .layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, self_attention,
                     weight_init)
from .precond import (EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond, iddpm_sigma_levels, vp_sigma,
                      vp_sigma_inv)
from .unets import DhariwalUNet, SongUNet

__all__ = [
    "Conv2d", "FourierEmbedding", "GroupNorm", "Linear", "PositionalEmbedding", "UNetBlock", "self_attention",
    "weight_init", "EDMPrecond", "Precond", "VEPrecond", "VPPrecond", "iDDPMPrecond", "iddpm_sigma_levels",
    "vp_sigma", "vp_sigma_inv", "DhariwalUNet", "SongUNet",
]
