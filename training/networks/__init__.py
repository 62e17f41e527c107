"""Networks of the paper: the raw U-Nets F and the preconditioners D of Table 1 / Eq. 7; and EDM2's
magnitude-preserving U-Net with its preconditioner (``edm2``).

Official configs name these classes as ``training.networks.<Class>``; that path keeps working here. EDM2's
classes keep their official names (``Precond``, ``UNet``, ...) in ``training.networks.edm2`` and in pickles; here
they are exported as ``EDM2Precond``, ``EDM2UNet``, ``EDM2Block``, since ``Precond`` is also the EDM
preconditioners' (never pickled) base class.
"""

from .edm2 import Block as EDM2Block
from .edm2 import MPConv, MPFourier, mp_cat, mp_silu, mp_sum
from .edm2 import Precond as EDM2Precond
from .edm2 import UNet as EDM2UNet
from .layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, self_attention,
                     weight_init)
from .precond import (EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond, iddpm_sigma_levels, vp_sigma,
                      vp_sigma_inv)
from .unets import DhariwalUNet, SongUNet

__all__ = [
    "Conv2d", "FourierEmbedding", "GroupNorm", "Linear", "PositionalEmbedding", "UNetBlock", "self_attention",
    "weight_init", "EDMPrecond", "Precond", "VEPrecond", "VPPrecond", "iDDPMPrecond", "iddpm_sigma_levels",
    "vp_sigma", "vp_sigma_inv", "DhariwalUNet", "SongUNet",
    "EDM2Block", "EDM2Precond", "EDM2UNet", "MPConv", "MPFourier", "mp_cat", "mp_silu", "mp_sum",
]
