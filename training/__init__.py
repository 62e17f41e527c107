"""EDM's training side, one package per concept:

- ``networks``: the denoiser D, U-Nets and preconditioning (Table 1, Eq. 7; EDM2's magnitude-preserving U-Net);
- ``loss``: the training objectives (Table 1's noise distribution and loss weighting);
- ``sampling``: the paper's samplers, fast solvers by name, guidance, images for seeds;
- ``data``: the dataset format, dataset conversion, augmentation;
- ``ema``: EDM2's power-function EMA and its post-hoc reconstruction;
- ``loop``: the training loop and what only it uses;
- ``checkpoint`` (snapshot files, read safely), ``run_files`` (the names of a run's files), ``perf`` (speed
  switches), ``images`` (PNG files and grids): what several of them share.
"""

import dnnlib
from torch_utils import persistence

# Snapshots embed these modules' joined source for every network, loss and augmentation object, so that the
# official EDM loader, which executes that text as one stand-alone module, finds every class they need
# (torch_utils/snapshot_source.py). Order: a module may import only those before it.
persistence.declare_bundle("training.networks.layers", "training.networks.unets", "training.networks.precond",
                           "training.loss", "training.data.augment")
# EDM2's network is a bundle of its own: its class names (Precond, UNet, ...) are the official EDM2 ones, and
# 'Precond' is also the name of the EDM preconditioners' base class above. So are EDM2's encoders.
persistence.declare_bundle("training.networks.edm2")
persistence.declare_bundle("training.data.encoders")

# Class paths that the official releases' configs and snapshots (and ours, which keep them) name, where the module
# now lives elsewhere.
dnnlib.util.declare_moved_module("training.dataset", "training.data.dataset")
dnnlib.util.declare_moved_module("training.augment", "training.data.augment")
dnnlib.util.declare_moved_module("training.networks_edm2", "training.networks.edm2")
dnnlib.util.declare_moved_module("training.encoders", "training.data.encoders")
