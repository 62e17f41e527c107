"""Everything a resumed run needs to continue exactly where an interrupted one stopped.

``training-state-KKKKKK.pt`` (named by ``training.run_files``) is ``torch.save`` of tensors and plain data only
(loadable with ``torch.load(weights_only=True)``, so opening a file from elsewhere cannot run code): the training
network's and the EMA's ``state_dict``, the optimizer's ``state_dict``, the progress counters (images seen, ticks),
the position in the data stream, and the random-number-generator states of every rank (torch CPU, CUDA, numpy,
Python). Files are written under a temporary name and renamed, so a crash while writing leaves the previous state
intact.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

FORMAT = "edm-training-state"
VERSION = 1


class StateFileError(ValueError):
    """A training-state file that cannot be resumed from; the message names the file and the fix."""


# ----------------------------------------------------------------------------
# Random-number-generator states as tensors and plain data.

def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: torch CPU, the CUDA device (if any), numpy's and Python's global ones."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = dict(torch_cpu=torch.get_rng_state(),
                 numpy=dict(kind=np_kind, keys=torch.from_numpy(np_keys.astype(np.int64)), pos=int(np_pos),
                            has_gauss=int(np_has_gauss), cached_gaussian=float(np_gauss)),
                 python=dict(version=py_version, internal=torch.tensor(py_internal, dtype=torch.int64),
                             gauss_next=py_gauss))
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective call: all ranks must make it)."""
    mine = capture_rng_state(device)
    if dist.get_world_size() == 1:
        return [mine]
    states: list = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


# ----------------------------------------------------------------------------

@dataclass
class TrainingState:
    """The training network, its EMA, the optimizer and the progress counters.

    ``cur_nimg`` counts images seen (globally), which is also the position of the data stream: every step
    consumes the next ``batch_size`` positions (see torch_utils.misc.InfiniteSampler).
    """

    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cur_nimg: int = 0
    cur_tick: int = 0
    extra: dict = field(default_factory=dict)  # Plain data recorded for checks on resume (batch size, ...).
    phema: Any = None  # training.phema.PowerFunctionEMA when the run tracks power-function EMAs (--ema-std).

    @property
    def data_position(self) -> int:
        return self.cur_nimg

    def save(self, path: str, device: torch.device) -> None:
        """Write the state (a collective call, for the RNG states; rank 0 writes the file)."""
        rng_states = gather_rng_states(device)
        if not dist.is_main():
            return
        data = dict(format=FORMAT, version=VERSION, net=_cpu(self.net.state_dict()), ema=_cpu(self.ema.state_dict()),
                    optimizer_state=self.optimizer.state_dict(), cur_nimg=int(self.cur_nimg),
                    cur_tick=int(self.cur_tick), data_position=int(self.data_position),
                    rng_states=rng_states, world_size=dist.get_world_size(), **self.extra)
        if self.phema is not None:
            data["phema"] = _cpu_phema(self.phema.state_dict())
        atomic_torch_save(data, path)

    def load(self, path: str, device: torch.device) -> dict[str, Any]:
        """Restore networks, optimizer and counters from ``path``; returns the file's dict (for its RNG
        states, which the caller restores last, once nothing else will draw from the generators)."""
        data = read_state_file(path)
        for name, module in (("net", self.net), ("ema", self.ema)):
            try:
                module.load_state_dict(data[name], strict=True)
            except RuntimeError as e:
                raise StateFileError(f"{path}: its {name} does not fit the network built from these options "
                                     f"(same --arch/--cbase/--cres/--cond/--augment as the original run?): "
                                     f"{str(e).strip().splitlines()[0]}") from None
        self.optimizer.load_state_dict(data["optimizer_state"])
        self._load_phema(path, data.get("phema"))
        self.cur_nimg = int(data["cur_nimg"])
        self.cur_tick = int(data["cur_tick"])
        return data


    def _load_phema(self, path: str, saved: dict | None) -> None:
        tracked = None if self.phema is None else list(self.phema.stds)
        written = None if saved is None else [float(std) for std in saved["stds"]]
        if tracked != written:
            raise StateFileError(f"{path}: the state tracks power-function EMAs with sigma_rel {written or 'none'}, "
                                 f"these options {tracked or 'none'}; resume with the original run's --ema-std")
        if saved is not None:
            try:
                self.phema.load_state_dict(saved)
            except RuntimeError as e:
                raise StateFileError(f"{path}: its power-function EMAs do not fit the network built from these "
                                     f"options: {str(e).strip().splitlines()[0]}") from None


def _cpu(state_dict: dict) -> dict:
    return {name: tensor.detach().cpu() for name, tensor in state_dict.items()}


def _cpu_phema(state: dict) -> dict:
    return dict(stds=[float(std) for std in state["stds"]], emas=[_cpu(ema) for ema in state["emas"]])


def restore_rank_rng(data: dict[str, Any], device: torch.device) -> bool:
    """Restore this rank's RNG states from a loaded state file. False (and nothing restored) when the file
    was written by a run with a different number of processes, which cannot continue bit-exactly."""
    states = data.get("rng_states") or []
    if len(states) != dist.get_world_size():
        return False
    restore_rng_state(states[dist.get_rank()], device)
    return True


def read_state_file(path: str) -> dict[str, Any]:
    """Load a state file with ``weights_only=True``; clear errors for missing, corrupt or foreign files."""
    if not os.path.isfile(path):
        raise StateFileError(f"{path}: no such training-state file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise StateFileError(f"{path}: holds pickled objects, not a state written by this code (official EDM "
                                 f"training states pickle the network; continue from those with "
                                 f"--transfer=network-snapshot-*.pkl)") from None
        raise StateFileError(f"{path}: unreadable training-state file ({str(e).strip().splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise StateFileError(f"{path}: unreadable training-state file ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a training-state file of this code")
    if data.get("version", 0) > VERSION:
        raise StateFileError(f"{path}: written by a newer version (format {data['version']}); update the code")
    return data


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: readers never see a partial file."""
    with dnnlib.util.atomic_open(path) as f:
        torch.save(obj, f)
