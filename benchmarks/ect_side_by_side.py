"""Our consistency loss against ECT's own (locuslab/ect), on the same network, batch, noise and stage: the loss per
image and the gradient of its sum, for ECT's CIFAR-10 settings (its main branch: 1 / (t - r), c = 0) and its EDM2
settings (its imgnet branch: EDM's weighting, c = 0.06, q = 4).

ECT's code is not part of this repository. Export its two loss files into a scratch folder first, as packages:

    mkdir -p /tmp/ect/cifar /tmp/ect/imgnet && touch /tmp/ect/cifar/__init__.py /tmp/ect/imgnet/__init__.py
    git -C ECT_CLONE show main:training/loss.py > /tmp/ect/cifar/loss.py
    git -C ECT_CLONE show imgnet:training/loss.py > /tmp/ect/imgnet/loss.py
    git -C ECT_CLONE show imgnet:training/networks_edm2.py > /tmp/ect/imgnet/networks_edm2.py
    python benchmarks/ect_side_by_side.py --ect=/tmp/ect --out=benchmarks/results/ect-side-by-side.json

ECT keeps the student's dropout masks for its target by saving and restoring the CUDA generator; on a CPU both losses
run without dropout, and ECT's CUDA generator calls are pointed at the CPU's. Both networks are in eval mode, so
neither renormalizes EDM2's weights in place (ECT's target call and ours both skip that; tests/test_consistency.py
checks ours in training mode).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from training.loss import ConsistencyLoss  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402
from training.networks.edm2 import Precond as EDM2Precond  # noqa: E402

SETTINGS = {  # ECT's loss arguments, ours for the same, and the network.
    "cifar": dict(ect=dict(P_mean=-1.1, P_std=2.0, q=2, c=0.0, k=8.0, b=1.0),
                  ours=dict(P_mean=-1.1, P_std=2.0, q=2, c=0.0, k=8.0, b=1.0, weighting="ect"),
                  network=lambda: EDMPrecond(8, 3, 0, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                                             num_blocks=1, attn_resolutions=[4], dropout=0)),
    "imgnet": dict(ect=dict(P_mean=-0.8, P_std=1.6, q=4, c=0.06, k=8.0, b=1.0),
                   ours=dict(P_mean=-0.8, P_std=1.6, q=4, c=0.06, k=8.0, b=1.0, weighting="edm"),
                   network=lambda: EDM2Precond(8, 3, 10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                               attn_resolutions=[4], dropout=0)),
}


def ect_loss_class(folder: str, branch: str):
    from torch_utils import persistence
    persistence.persistent_class = lambda cls: cls  # ECT's classes are only called here, never pickled.
    sys.path.insert(0, folder)
    torch.cuda.get_rng_state = torch.get_rng_state  # ECT saves and restores the CUDA generator; here the CPU's.
    torch.cuda.set_rng_state = torch.set_rng_state
    return importlib.import_module(f"{branch}.loss").ECMLoss


def loss_and_grads(loss_fn, net, images, labels, seed: int) -> tuple[torch.Tensor, dict]:
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(net, images, labels).flatten()
    loss.sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def compare(folder: str, branch: str, stage: int, seed: int = 0, batch: int = 16) -> dict:
    setting = SETTINGS[branch]
    theirs = ect_loss_class(folder, branch)(**setting["ect"])
    theirs.update_schedule(stage)
    ours = ConsistencyLoss(**setting["ours"], stage_nimg=1)
    ours.set_progress(stage)
    torch.manual_seed(1)
    net = setting["network"]().eval()
    images = torch.randn([batch, 3, 8, 8], generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    labels = None if not net.label_dim else torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim]
    ect_loss, ect_grads = loss_and_grads(theirs, net, images, labels, seed)
    our_loss, our_grads = loss_and_grads(ours, net, images, labels, seed)
    assert ect_grads.keys() == our_grads.keys()
    grad_error = max(float((our_grads[k] - ect_grads[k]).abs().max() / ect_grads[k].abs().max().clamp(min=1e-30))
                     for k in ect_grads)
    return dict(branch=branch, stage=stage, batch=batch,
                loss_max_relative_difference=float(((our_loss - ect_loss).abs() / ect_loss.abs()).max()),
                grad_max_relative_difference=grad_error, ect_loss_mean=float(ect_loss.mean()),
                our_loss_mean=float(our_loss.mean()))


@click.command()
@click.option("--ect", "folder", required=True, metavar="DIR", help="The scratch folder with ECT's losses as packages")
@click.option("--out", metavar="JSON", help="Where to write the results")
def main(folder: str, out: str | None):
    """Compare our ConsistencyLoss with ECT's ECMLoss, value and gradient."""
    results = [compare(folder, branch, stage) for branch in ("cifar", "imgnet") for stage in (0, 2, 5)]
    for r in results:
        print(f"{r['branch']:6s} stage {r['stage']}: loss {r['our_loss_mean']:.6f} vs ECT {r['ect_loss_mean']:.6f}, "
              f"max relative difference {r['loss_max_relative_difference']:.2e} (loss), "
              f"{r['grad_max_relative_difference']:.2e} (gradient)")
    if out:
        with open(out, "w") as f:
            json.dump(dict(ect_commits=dict(main="4311059", imgnet="75aa88a"), results=results), f, indent=1)


if __name__ == "__main__":
    main()
