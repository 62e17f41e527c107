"""Helpers for the training tests: a split-invariant loss, a loss that sends SIGTERM, and a worker that
runs ``training_loop`` under torchrun with a JSON config (``python distributed_worker.py '{...}'``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib

import torch

from training.loss import EDMLoss


class ContentSeededLoss(EDMLoss):
    """The EDM loss with each image's sigma and noise drawn from a generator seeded by the image's pixels.
    The gradient of a batch then does not depend on how the batch is split over processes or
    accumulation rounds, which lets tests compare those splits."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigmas, noises = [], []
        for image in images:
            g = torch.Generator().manual_seed(zlib.crc32(image.detach().cpu().numpy().tobytes()))
            sigmas.append((torch.randn([1, 1, 1], generator=g) * self.P_std + self.P_mean).exp())
            noises.append(torch.randn(image.shape, generator=g))
        sigma = torch.stack(sigmas).to(images.device)
        noise = torch.stack(noises).to(images.device) * sigma
        D = net(images + noise, sigma, labels)
        return self.weight(sigma) * (D - images) ** 2


class SigtermAtCall(EDMLoss):
    """The EDM loss that sends this process SIGTERM at its ``at``-th call (a pre-empted job)."""

    def __init__(self, at: int = 3):
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(*args, **kwargs)


def main() -> None:
    from torch_utils import distributed as dist
    from training.loop.training_loop import training_loop

    config = json.loads(sys.argv[1])
    state = training_loop(**config)
    if dist.is_main():
        torch.save(state.net.state_dict(), os.path.join(config["run_dir"], "final-net.pt"))
    dist.shutdown()


if __name__ == "__main__":
    main()
