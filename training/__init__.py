"""EDM's training side: networks, preconditioning, losses, augmentation, datasets, samplers, the loop."""

from torch_utils import persistence

# Snapshots embed these modules' joined source for every network, loss and augmentation object, so that the
# official EDM loader, which executes that text as one stand-alone module, finds every class they need
# (torch_utils/snapshot_source.py). Order: a module may import only those before it.
persistence.declare_bundle("training.networks.layers", "training.networks.unets", "training.networks.precond",
                           "training.loss", "training.augment")
# EDM2's network is a bundle of its own: its class names (Precond, UNet, ...) are the official EDM2 ones, and
# 'Precond' is also the name of the EDM preconditioners' base class above.
persistence.declare_bundle("training.networks.edm2")
