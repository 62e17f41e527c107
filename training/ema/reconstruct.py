"""Post-hoc EMA from a folder of power-function EMA snapshots (EDM2, Appendix C): which snapshots to combine and
with which weights (``plan_reconstruction``), the combined networks (``reconstructed_networks``), and the
``phema-KKKKKKK-S.SSS.pkl`` files that reconstruct_phema.py writes (``reconstruct``)."""

from __future__ import annotations

import copy
import os
import pickle
import time
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dnnlib.util import atomic_write_bytes
from torch_utils import persistence
from training.checkpoint import SafeUnpickler, load_network_pkl
from training.ema.phema import solve_posthoc_coefficients
from training.run_files import (PHEMA_PREFIX, SnapshotName, format_kimg, list_power_snapshots, power_snapshot_name,
                                snapshot_time_at)


class PosthocPlan(NamedTuple):
    """What a post-hoc reconstruction reads and makes: see ``plan_reconstruction``."""
    inputs: list[tuple[str, SnapshotName]]  # The snapshots averaged, sorted by time, then sigma_rel.
    out_nimg: int                           # The time of the outputs, in images.
    outstd: list[float]                     # Their sigma_rel, ascending, without repeats.
    coefficients: np.ndarray                # [inputs, outputs] weights (solve_posthoc_coefficients).


def plan_reconstruction(indir: str, outstd: Sequence[float], outkimg: float | None = None,
                        inprefix: str | None = None, instd: Sequence[float] | None = None,
                        outprefix: str = PHEMA_PREFIX) -> PosthocPlan:
    """The inputs and weights of each sigma_rel in ``outstd`` as of the snapshot time ``outkimg`` (default: the
    latest), from the snapshots in ``indir`` up to then (those named by ``list_power_snapshots(indir, inprefix,
    outprefix, instd)``), solved as in Algorithm 3. Reads no network; raises ValueError with one line when the
    folder, the time or a sigma_rel cannot work."""
    if not os.path.isdir(indir):
        raise ValueError(f"{indir}: no such folder")
    inputs = list_power_snapshots(indir, prefix=inprefix, exclude_prefix=outprefix, sigma_rels=instd)
    if not inputs:
        raise ValueError(f"{indir}: no raw EMA snapshots ({inprefix or 'PREFIX'}-KKKKKKK-S.SSS.pkl) in this folder")
    out_nimg = inputs[-1][1].nimg
    if outkimg is not None:
        times = sorted({name.nimg for _, name in inputs})
        out_nimg = snapshot_time_at(times, outkimg)
        if out_nimg is None:
            listed = ", ".join(format_kimg(t) for t in times[:5]) + (", ..." if len(times) > 5 else "")
            raise ValueError(f"{indir}: no snapshot at {outkimg:g} kimg to reconstruct at (snapshots at {listed} kimg)")
    inputs = [(path, name) for path, name in inputs if 0 < name.nimg <= out_nimg]
    if not inputs:
        raise ValueError(f"{indir}: only snapshots at 0 kimg, which hold no average of training")
    outstd = sorted({float(std) for std in outstd})
    if not outstd:
        raise ValueError("no sigma_rel to reconstruct")
    coefficients = solve_posthoc_coefficients([name.nimg for _, name in inputs],
                                              [name.sigma_rel for _, name in inputs], out_nimg, outstd)
    return PosthocPlan(inputs, out_nimg, outstd, coefficients)


def reconstructed_networks(plan: PosthocPlan, outputs: Sequence[int] | None = None, batch: int = 8,
                           progress: bool = True) -> Iterator[tuple[float, torch.nn.Module]]:
    """(sigma_rel, network) for each output of ``plan`` (indices into ``plan.outstd``; default: all), in memory:
    the network is the latest input's with its float parameters and buffers set to the coefficient-weighted sums
    of the inputs' (Appendix C; accumulated in float32 or wider, stored in the network's dtype), its other
    buffers as they are there. Every input is read once per ``batch`` outputs.

    The networks of one batch are one module whose tensors each step overwrites: use (or copy) each before
    asking for the next."""
    outputs = list(range(len(plan.outstd))) if outputs is None else list(outputs)
    batches = [outputs[i:i + batch] for i in range(0, len(outputs), batch)]
    with tqdm(total=len(batches) * len(plan.inputs), unit="pkl", desc="Reconstructing", disable=not progress) as bar:
        for columns in batches:
            sums, net = _weighted_sums([path for path, _ in plan.inputs], plan.coefficients[:, columns], bar)
            for column, weighted in zip(columns, sums):
                _load_floats(net, weighted)
                yield plan.outstd[column], net


def reconstruct(indir: str, outdir: str, outstd: Sequence[float], outkimg: float | None = None, batch: int = 8,
                inprefix: str | None = None, instd: Sequence[float] | None = None, outprefix: str = PHEMA_PREFIX,
                skip_existing: bool = False, progress: bool = True) -> dict:
    """Write ``PHEMA-KKKKKKK-S.SSS.pkl`` (prefix ``outprefix``) to ``outdir`` for each sigma_rel in ``outstd``,
    as of the snapshot time ``outkimg`` (default: the latest), from the snapshots in ``indir`` up to then (those
    named by ``list_power_snapshots(indir, inprefix, outprefix, instd)``). With ``skip_existing``, outputs already in
    ``outdir`` are left as they are.

    Each output's network is that of ``reconstructed_networks``; the rest of its snapshot dict (keys, loss,
    encoder, dataset_kwargs, as pickled) is the latest input's. Every input is read once per ``batch`` outputs.
    Returns a summary: paths written, inputs used, coefficients, seconds."""
    start = time.time()
    plan = plan_reconstruction(indir, outstd, outkimg, inprefix, instd, outprefix)
    out_paths = [os.path.join(outdir, power_snapshot_name(plan.out_nimg, std, outprefix)) for std in plan.outstd]
    todo = [j for j, path in enumerate(out_paths) if not (skip_existing and os.path.isfile(path))]
    template = None
    if todo:
        template = _load_verbatim(plan.inputs[-1][0])
        os.makedirs(outdir, exist_ok=True)
    networks = reconstructed_networks(plan, todo, batch, progress)
    for column, (_, net) in zip(todo, networks):
        data = copy.copy(template)
        data["ema"] = net
        atomic_write_bytes(out_paths[column], pickle.dumps(data, protocol=4))
    return dict(paths=[out_paths[j] for j in todo], skipped=[p for j, p in enumerate(out_paths) if j not in todo],
                out_nimg=plan.out_nimg, outstd=plan.outstd, inputs=[path for path, _ in plan.inputs],
                coefficients=plan.coefficients, seconds=time.time() - start)


@torch.no_grad()
def _weighted_sums(paths: Sequence[str], coefficients: np.ndarray, bar) -> tuple[list[dict], torch.nn.Module]:
    """For each column of ``coefficients`` [inputs, outputs], sum_i c_i * (float tensors of input i's network's
    state_dict); loads one input at a time. Also returns the last input's network."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in range(coefficients.shape[1])]
    shapes = None
    for row, path in enumerate(paths):
        net = load_network_pkl(path)["ema"]
        state = {name: tensor for name, tensor in net.state_dict().items() if tensor.is_floating_point()}
        shapes = shapes or {name: tensor.shape for name, tensor in state.items()}
        if {name: tensor.shape for name, tensor in state.items()} != shapes:
            raise ValueError(f"{path}: its network's tensors differ from those of the snapshots before it")
        for weighted, c in zip(sums, coefficients[row].tolist()):
            for name, tensor in state.items():
                tensor = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
                weighted[name] = tensor * c if row == 0 else weighted[name].add_(tensor, alpha=c)
        bar.update(1)
    return sums, net


@torch.no_grad()
def _load_floats(net: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in net.state_dict(keep_vars=True).items():
        if name in tensors:
            tensor.copy_(tensors[name])


class _Verbatim:
    """A persistent object of a snapshot (a loss, an encoder, a network) kept as its pickled description: it is
    written back exactly as it was read, whether or not we have its class, and nothing of it runs."""

    def __init__(self, meta: dict):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


class _VerbatimUnpickler(SafeUnpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _Verbatim
        return super().find_class(module, name)


def _load_verbatim(path: str) -> dict:
    """A snapshot's dict as pickled (dict or EasyDict, its own keys), persistent objects kept verbatim; its
    network is dropped, to be replaced."""
    with open(path, "rb") as f:
        data = _VerbatimUnpickler(f).load()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a snapshot dict holding the network under 'ema'")
    data = copy.copy(data)
    data["ema"] = None
    return data
