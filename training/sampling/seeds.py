"""Seeds, latents and class labels as the official generate.py draws them: each image's random numbers come from
its own seed, so an image depends only on its seed, the network and the sampler options (never on the batch)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

class SeedRNG:
    """One ``torch.Generator`` per seed (seeded with seed mod 2^32, on ``device``); every draw of shape
    [N, ...] gives image i the draw of shape [...] from seed i's generator. A seed's stream therefore does not
    depend on which other seeds share its batch."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _per_seed(self, size, draw: Callable[[list[int], torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``draw(one image's shape, generator)`` for every seed, stacked; ``size[0]`` must be the seed count."""
        batch, *item_shape = list(size) or [None]
        if batch != len(self.generators):
            raise ValueError(f"first dimension {batch} != number of seeds {len(self.generators)}")
        return torch.stack([draw(item_shape, generator) for generator in self.generators])

    def randn(self, size, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Unit Gaussian noise of shape ``size``, row i from seed i."""
        on = device or self.device
        return self._per_seed(size, lambda shape, gen: torch.randn(shape, generator=gen, dtype=dtype, device=on))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """``randn`` with the shape, dtype and device of ``x``."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size, device: torch.device | str | None = None) -> torch.Tensor:
        """Integers in [0, high) of shape ``size``, row i from seed i."""
        on = device or self.device
        return self._per_seed(size, lambda shape, gen: torch.randint(high, size=shape, generator=gen, device=on))


def draw_latents(net, rng: SeedRNG) -> torch.Tensor:
    """Per seed, the first draw: unit Gaussian noise [C, H, W] (float32)."""
    return rng.randn([len(rng.generators), net.img_channels, net.img_resolution, net.img_resolution])


BALANCED = "balanced"  # As a class: seed s gets class s mod the class count.


def draw_class_labels(net, rng: SeedRNG, class_idx: int | str | None = None) -> torch.Tensor | None:
    """Per seed, the second draw for a conditional network: a one-hot label of a uniformly drawn class. With
    ``class_idx`` every label becomes that class, and with ``BALANCED`` seed s gets class s mod the class count,
    so consecutive seeds cover the classes equally often (the random draws' class counts differ from a balanced
    reference's by about sqrt(n / classes) each, which a metric such as FID counts as error). Either way the draw
    is still made, so later draws stay aligned."""
    label_dim = getattr(net, "label_dim", 0)
    if not label_dim:
        if class_idx is not None:
            raise ValueError(f"class {class_idx} requested, but the network is unconditional")
        return None
    labels = torch.eye(label_dim, device=rng.device)[rng.randint(label_dim, size=[len(rng.generators)])]
    if class_idx == BALANCED:
        return torch.eye(label_dim, device=rng.device)[[seed % label_dim for seed in rng.seeds]]
    if class_idx is not None:
        if not isinstance(class_idx, int) or not 0 <= class_idx < label_dim:
            raise ValueError(f"class {class_idx} is out of range: the network has classes 0..{label_dim - 1}")
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


