"""The one place that decides the device and the distributed setup.

Processes launched by ``torchrun`` (any ``--nproc_per_node`` / ``--nnodes``) find their rank and world
size in the environment; a plain ``python script.py`` is a world of one and needs no process group.
NCCL is used on CUDA devices, gloo on CPUs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_device: torch.device | None = None


def pick_device(requested: str | None = None) -> torch.device:
    """Choose the device: the requested one, else this process's CUDA GPU if there is one, else the CPU."""
    if requested not in (None, "", "auto"):
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device={requested}: CUDA is not available on this machine; use --device=cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init(device: str | None = None, timeout_minutes: float = 30) -> torch.device:
    """Set up this process: pick its device and, under torchrun, join the process group. Returns the device."""
    global _device
    _device = pick_device(device)
    if _device.type == "cuda":
        torch.cuda.set_device(_device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if _device.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if _device.type == "cuda":
            kwargs["device_id"] = _device
        dist.init_process_group(**kwargs)
    return _device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_device() -> torch.device:
    return _device if _device is not None else pick_device()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on the main process only."""
    if is_main():
        print(*args, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (no-op in a world of one)."""
    if dist.is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all processes along dim 0, in rank order."""
    if not dist.is_initialized() or get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of a list: every world_size-th item starting at its rank."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return items[rank::world_size]
