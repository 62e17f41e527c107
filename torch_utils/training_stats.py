"""Scalar statistics collected during a training tick and reduced over all processes.

A ``StatsCollector`` accumulates, per name, the count, sum and sum of squares of every value reported
(tensors contribute all their elements), on the training device and without synchronising. ``collect()``
sums these moments over ranks once per tick and returns ``{name: {"num", "mean", "std"}}``, the layout of the
official ``stats.jsonl``. All ranks must report the same names (``report0`` registers a name everywhere
and counts the value on rank 0 only).
"""

from __future__ import annotations

import math

import torch

from torch_utils import distributed as dist


class StatsCollector:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._moments: dict[str, torch.Tensor] = {}

    def _accumulate(self, name: str, value) -> None:
        if name not in self._moments:
            self._moments[name] = torch.zeros(3, dtype=torch.float64, device=self.device)
        if value is None:
            return
        value = torch.as_tensor(value).detach().to(self.device, torch.float64).flatten()
        # new_full, not torch.tensor(..., device=): a fill kernel instead of a host-to-device copy per report.
        self._moments[name] += torch.stack([value.new_full([], value.numel()), value.sum(), value.square().sum()])

    def report(self, name: str, value):
        """Count a scalar or all elements of a tensor under ``name``; returns ``value``."""
        self._accumulate(name, value)
        return value

    def report_moments(self, name: str, moments: torch.Tensor) -> None:
        """Add precomputed (count, sum, sum of squares) [3] under ``name``: values summed elsewhere on the device,
        e.g. per bucket, without selecting them on the host."""
        self._accumulate(name, None)
        self._moments[name] += moments.detach().to(self.device, torch.float64)

    def report0(self, name: str, value):
        """Like ``report``, but only rank 0's value counts (for values that are the same everywhere)."""
        self._accumulate(name, value if dist.is_main() else None)
        return value

    def collect(self) -> dict[str, dict[str, float]]:
        """Reduce this tick's moments over all ranks, return them as num/mean/std, and start a new tick."""
        names = sorted(self._moments)
        if not names:
            return {}
        moments = dist.all_reduce_sum(torch.stack([self._moments[name] for name in names])).cpu()
        self._moments = {}
        result = {}
        for name, (num, total, total_sq) in zip(names, moments.tolist()):
            mean = total / num if num else math.nan
            std = math.sqrt(max(total_sq / num - mean ** 2, 0)) if num else math.nan
            result[name] = dict(num=num, mean=mean, std=std)
        return result
