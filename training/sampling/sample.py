"""Images for seeds: what generate.py, fid.py, the EMA sweep and the training loop's grids and metrics all call,
with the sampler given as one ``SamplerSpec`` (``spec``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from training.sampling.seeds import SeedRNG, draw_class_labels, draw_latents
from training.sampling.spec import PaperSampler, SamplerSpec


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 as saved to PNG: (x * 127.5 + 128).clip(0, 255), truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_images(net, seeds: Sequence[int], class_idx: int | str | None = None,
                    device: torch.device | str | None = None, decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8,
                    sampler: SamplerSpec = PaperSampler()) -> torch.Tensor:
    """Images for ``seeds`` exactly as generate.py saves them: uint8 [len(seeds), C, H, W] on ``device``
    (default: the network's). Each image depends only on its seed, the network and the ``sampler``. ``decode``
    turns the sampler's output into pixels: ``to_uint8`` for a network of pixels, an encoder's ``decode`` for one of
    latents (``training.data.encoders``)."""
    if len(seeds) == 0:
        raise ValueError("no seeds given")
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu")) if hasattr(net, "parameters") else "cpu"
    rng = SeedRNG(seeds, device)
    latents = draw_latents(net, rng)
    class_labels = draw_class_labels(net, rng, class_idx)
    return decode(sampler.run(net, latents, class_labels, randn_like=rng.randn_like))
