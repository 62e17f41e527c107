"""Small training utilities that know nothing of networks or losses: the data stream and parameter copies."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch


class InfiniteSampler(torch.utils.data.Sampler):
    """An endless, seeded, shuffled stream of dataset indices, sharded over ranks and resumable.

    The global stream is the concatenation of epochs; epoch ``e`` is a permutation of the dataset drawn from
    ``(seed, e)``. Global position ``g`` holds ``permutation_e[g % n]`` with ``e = g // n``. Rank ``r`` of
    ``num_replicas`` takes the positions ``g = r, r + R, r + 2R, ...`` from ``start`` on. A training step
    with a global batch of B images therefore uses exactly the positions ``[s B, (s + 1) B)`` whatever the
    number of ranks or accumulation rounds, and a run resumed with ``start = images seen`` continues the
    same stream.
    """

    def __init__(self, dataset: Sized, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 start: int = 0):
        if len(dataset) == 0:
            raise ValueError("InfiniteSampler: the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"InfiniteSampler: rank {rank} is outside 0..{num_replicas - 1}")
        super().__init__()
        self.size, self.shuffle, self.seed = len(dataset), shuffle, seed
        self.rank, self.num_replicas, self.start = rank, num_replicas, start

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        position = self.start + (self.rank - self.start) % self.num_replicas
        epoch, order = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.epoch_order(epoch)
            yield int(order[position % self.size])
            position += self.num_replicas


@torch.no_grad()
def randomize_parameters(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 1 / fan-in) by a seeded CPU generator (the same values on every device),
    in place; zero-initialised output layers then no longer hide the rest of a network in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return module


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> list[str]:
    """Copy tensors of the same name and shape from one module into another; returns the names copied.
    With ``require_all`` every parameter and buffer of ``dst_module`` must be found."""
    src = {name: tensor for name, tensor in list(src_module.named_parameters()) + list(src_module.named_buffers())}
    copied = []
    for name, tensor in list(dst_module.named_parameters()) + list(dst_module.named_buffers()):
        if name in src and src[name].shape == tensor.shape:
            tensor.copy_(src[name].detach())
            copied.append(name)
        elif require_all:
            raise ValueError(f"'{name}' {tuple(tensor.shape)} has no counterpart of that shape in the source network")
    return copied


def clone_module(module: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """A copy of a persistent-class module (see torch_utils/persistence.py): a new instance from its
    recorded constructor call, built without initialising weights, holding clones of its tensors.
    ``copy.deepcopy`` would go through the pickle format, rebuilding every submodule; this does not."""
    args, kwargs = module.__dict__.get("_init_args"), module.__dict__.get("_init_kwargs")
    if args is None or kwargs is None:
        raise TypeError(f"{type(module).__name__} does not record its constructor call (not a persistent class)")
    with torch.device("meta"):
        copy = type(module)(*args, **kwargs)
    device = device if device is not None else next(iter(module.state_dict().values()), torch.empty(0)).device
    state = {name: tensor.detach().to(device, copy=True) for name, tensor in module.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(copy.parameters()) + list(copy.buffers())):
        raise TypeError(f"{type(module).__name__} has tensors outside its state_dict; clone it with copy.deepcopy")
    return copy.train(module.training)
