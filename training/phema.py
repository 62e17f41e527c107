"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, Section 3 and Appendix C).

A power-function EMA averages the training trajectory theta(tau) with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t

whose width is given relative to its length t: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
Training keeps one such EMA per sigma_rel (``PowerFunctionEMA``) and saves them now and then; afterwards, any
other sigma_rel at any saved time is approximated by a weighted sum of the saved snapshots, the weights solving
a least-squares fit of the profiles (``solve_posthoc_coefficients``, ``reconstruct``).

Time is counted in images throughout (``nimg``), as the training loop counts it; the fit depends only on
ratios of times, so the unit drops out.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import time
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dnnlib.util import atomic_write_bytes
from torch_utils import persistence
from torch_utils.misc import clone_module
from training.checkpoint import SafeUnpickler, load_network_pkl

# sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at gamma + 1 = (sqrt(5) - 1) / 2, then falls back to
# 0 as gamma -> infinity; a profile of sigma_rel above the peak does not exist. Below it, two gammas give the
# same sigma_rel; the EMA is the larger one (the averaging branch, which weights recent steps more).
GAMMA_AT_PEAK = (math.sqrt(5) - 1) / 2 - 1


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """sigma_rel of the profile p_{t,gamma}: its standard deviation over its length t (Appendix C, Eq. 123)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    sigma_rel = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    return sigma_rel.item() if sigma_rel.ndim == 0 else sigma_rel


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_PEAK)  # 0.3003


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """The exponent gamma of a power-function EMA of relative width sigma_rel, 0 < sigma_rel <= 0.3003 (Eq. 126,
    Algorithm 2). Squaring Eq. 123 and clearing its denominator gives the cubic
    sigma_rel^2 (gamma^3 + 7 gamma^2 + 16 gamma + 12) - (gamma + 1) = 0; gamma is its largest real root."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all((sigma_rel > 0) & (sigma_rel <= SIGMA_REL_MAX)):
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}]; got {sigma_rel.tolist()}")
    gammas = []
    for s2 in sigma_rel.reshape(-1) ** 2:
        roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
        gammas.append(max(GAMMA_AT_PEAK, roots.real[np.abs(roots.imag) <= 1e-9 * np.abs(roots)].max()))
    gamma = np.array(gammas).reshape(sigma_rel.shape)
    return gamma.item() if gamma.ndim == 0 else gamma


# The names the official EDM2 code gives these two functions.
std_to_exp, exp_to_std = sigma_rel_to_gamma, gamma_to_sigma_rel


def power_function_beta(sigma_rel: float, t_next: float, t_delta: float) -> float:
    """EMA decay beta for advancing the EMA of width sigma_rel from time t_next - t_delta to t_next (Eq. 127).

    Discretising the profile at steps of length t_delta gives beta = (1 - 1/t)^(gamma + 1) with t counted in steps,
    i.e. (1 - t_delta / t_next)^(gamma + 1) in any unit; on the first step (t_next = t_delta) beta = 0 and the
    EMA starts at the network's weights."""
    return (1 - t_delta / t_next) ** (sigma_rel_to_gamma(sigma_rel) + 1)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over tau of the product of the two profiles (Eq. 151),
    elementwise over broadcast arrays. In closed form, with t = min(t_a, t_b):

        (gamma_a + 1) (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t/t_a)^(gamma_a+1) (t/t_b)^(gamma_b+1) / t

    written with ratios of times, as tau^gamma itself overflows float64 for large gamma and t."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t = np.minimum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (t / t_a) ** (gamma_a + 1) * (t / t_b) ** (gamma_b + 1) / t)


def solve_posthoc_coefficients(in_nimg: Sequence[float], in_std: Sequence[float], out_nimg: float | Sequence[float],
                               out_std: Sequence[float]) -> np.ndarray:
    """Weights of the stored snapshots (profiles at ``in_nimg`` with widths ``in_std``) that best approximate
    each requested profile (``out_nimg``, ``out_std``; one time for all or one per output) in L2 (Algorithm 3):
    the normal equations A x = b with A = <p_i, p_j> and b = <p_i, p_out>. Returns [inputs, outputs], float64.

    Each column is then scaled to sum to 1. The exact least-squares weights sum to 1 only approximately; the
    profiles all integrate to 1, so a sum of 1 keeps the averaged weights at their scale."""
    in_nimg, in_gamma = np.asarray(in_nimg, dtype=np.float64), sigma_rel_to_gamma(np.asarray(in_std, dtype=np.float64))
    out_gamma = sigma_rel_to_gamma(np.asarray(out_std, dtype=np.float64)).reshape(-1)
    out_nimg = np.broadcast_to(np.asarray(out_nimg, dtype=np.float64), out_gamma.shape)
    if in_nimg.ndim != 1 or in_nimg.shape != np.shape(in_gamma) or len(in_nimg) == 0:
        raise ValueError("in_nimg and in_std must be two lists of the same, nonzero length")
    if np.any(in_nimg <= 0) or np.any(out_nimg <= 0):
        raise ValueError("snapshot times must be positive image counts")
    gram = profile_inner_product(in_nimg[:, None], in_gamma[:, None], in_nimg[None, :], in_gamma[None, :])
    target = profile_inner_product(in_nimg[:, None], in_gamma[:, None], out_nimg[None, :], out_gamma[None, :])
    weights = np.linalg.solve(gram, target)
    return weights / weights.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """One power-function EMA of ``net`` per sigma_rel in ``stds`` (Section 3.1). Call ``update`` after each
    optimizer step with the image count the step reached; ``emas`` maps sigma_rel to its EMA network."""

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        self.net = net
        self.stds = tuple(float(std) for std in stds)
        for std in self.stds:
            sigma_rel_to_gamma(std)  # Refuses a sigma_rel that no profile has.
        self._emas = [_copy_module(net).eval().requires_grad_(False) for _ in self.stds]

    @property
    def emas(self) -> dict[float, torch.nn.Module]:
        return dict(zip(self.stds, self._emas))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Advance every EMA over the step that took training from ``cur_nimg - batch_size`` to ``cur_nimg``
        images: theta_ema <- beta theta_ema + (1 - beta) theta. Buffers are copied."""
        net_params = [p.detach() for p in self.net.parameters()]
        net_buffers = list(self.net.buffers())
        for std, ema in zip(self.stds, self._emas):
            beta = power_function_beta(std, t_next=cur_nimg, t_delta=batch_size)
            torch._foreach_lerp_(list(ema.parameters()), net_params, 1 - beta)
            for ema_buffer, net_buffer in zip(ema.buffers(), net_buffers):
                ema_buffer.copy_(net_buffer)

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self._emas])

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["stds"]] != list(self.stds):
            raise ValueError(f"EMA state tracks sigma_rel {list(state['stds'])}, this run {list(self.stds)}")
        for ema, ema_state in zip(self._emas, state["emas"]):
            ema.load_state_dict(ema_state)


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    return clone_module(module) if persistence.is_persistent(module) else copy.deepcopy(module)


# ----------------------------------------------------------------------------
# Snapshot file names: PREFIX-KKKKKKK-S.SSS.pkl, KKKKKKK = images // 1000 (7 digits), S.SSS = sigma_rel.

RAW_PREFIX, PHEMA_PREFIX = "network-snapshot", "phema"
_SNAPSHOT_NAME = re.compile(r"(?P<prefix>.+)-(?P<kimg>\d+)(?:\.(?P<rest>\d{3}))?-(?P<sigma_rel>\d+\.\d+)\.pkl")


class SnapshotName(NamedTuple):
    prefix: str          # RAW_PREFIX for the EMAs our training loop saves, PHEMA_PREFIX for reconstructions.
    nimg: int            # Images seen (see nimg_from_kimg).
    sigma_rel: float


def snapshot_name(nimg: int, sigma_rel: float, prefix: str = RAW_PREFIX) -> str:
    """``network-snapshot-KKKKKKK-S.SSS.pkl`` (or another prefix), the official name, whenever ``nimg_from_kimg``
    reads the count back from it exactly (EDM2's power-of-two batches); otherwise ``KKKKKKK.RRR`` with RRR the
    images past whole kimg, so that small runs' names never collide and every count stays exact."""
    kimg, rest = divmod(int(nimg), 1000)
    label = f"{kimg:07d}" if nimg_from_kimg(kimg) == nimg else f"{kimg:07d}.{rest:03d}"
    return f"{prefix}-{label}-{sigma_rel:.3f}.pkl"


def phema_name(nimg: int, sigma_rel: float) -> str:
    """``phema-KKKKKKK-S.SSS.pkl``: a post-hoc reconstruction."""
    return snapshot_name(nimg, sigma_rel, PHEMA_PREFIX)


def nimg_from_kimg(kimg: int) -> int:
    """The image count behind a file name's KKKKKKK = images // 1000. EDM2 runs save at multiples of 1024 images
    (power-of-two batches), and exactly one multiple of 1024 can fall in [1000 KKKKKKK, 1000 KKKKKKK + 999]: where
    one does, it is the count (as the official reconstruction takes it too); otherwise 1000 KKKKKKK."""
    first, multiple = kimg * 1000, -(-kimg * 1000 // 1024) * 1024
    return multiple if multiple < first + 1000 else first


def format_kimg(nimg: int) -> str:
    """An image count in kimg as ``--outkimg`` takes it: '16' for 16,000 or 16,384 images, '16.032' for 16,032."""
    whole, rest = divmod(nimg, 1000)
    return str(whole) if rest == 0 or nimg == nimg_from_kimg(whole) else f"{whole}.{rest:03d}"


def snapshot_time_at(times: Sequence[int], kimg: float) -> int | None:
    """The snapshot time (images) among ``times`` that ``kimg`` names: an exact count (16.032 -> 16,032 images),
    or a file name's KKKKKKK (16 -> 16,384 in the official runs; our runs' 16,032 where it is the only snapshot
    between 16,000 and 16,999 images). None where none or several match."""
    if round(kimg * 1000) in times:
        return round(kimg * 1000)
    if kimg != int(kimg):
        return None
    if nimg_from_kimg(int(kimg)) in times:
        return nimg_from_kimg(int(kimg))
    within = [t for t in times if t // 1000 == int(kimg)]
    return within[0] if len(within) == 1 else None


def parse_snapshot_name(filename: str) -> SnapshotName | None:
    """Prefix, image count and sigma_rel of a ``PREFIX-KKKKKKK[.RRR]-S.SSS.pkl`` name (any folder); None for
    others."""
    match = _SNAPSHOT_NAME.fullmatch(os.path.basename(filename))
    if match is None:
        return None
    kimg = int(match["kimg"])
    nimg = nimg_from_kimg(kimg) if match["rest"] is None else kimg * 1000 + int(match["rest"])
    return SnapshotName(match["prefix"], nimg, float(match["sigma_rel"]))


def list_snapshots(indir: str, prefix: str | None = None, exclude_prefix: str | None = PHEMA_PREFIX,
                   sigma_rels: Iterable[float] | None = None) -> list[tuple[str, SnapshotName]]:
    """The snapshots ``PREFIX-KKKKKKK-S.SSS.pkl`` in ``indir``, sorted by time, then sigma_rel: those of
    ``prefix`` if given (ours are ``network-snapshot``; the official EDM2 release names its raw snapshots
    after the model), else of any prefix but ``exclude_prefix``; only those of ``sigma_rels`` if given."""
    found = []
    for entry in sorted(os.listdir(indir)):
        name = parse_snapshot_name(entry)
        if name is None or not os.path.isfile(os.path.join(indir, entry)):
            continue
        if (prefix is not None and name.prefix != prefix) or (prefix is None and name.prefix == exclude_prefix):
            continue
        if sigma_rels is not None and not any(math.isclose(name.sigma_rel, s, abs_tol=5e-4) for s in sigma_rels):
            continue
        found.append((os.path.join(indir, entry), name))
    return sorted(found, key=lambda item: (item[1].nimg, item[1].sigma_rel))


# ----------------------------------------------------------------------------
# Reconstruction from a folder of snapshots.

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
    latest), from the snapshots in ``indir`` up to then (those named by ``list_snapshots(indir, inprefix,
    outprefix, instd)``), solved as in Algorithm 3. Reads no network; raises ValueError with one line when the
    folder, the time or a sigma_rel cannot work."""
    if not os.path.isdir(indir):
        raise ValueError(f"{indir}: no such folder")
    inputs = list_snapshots(indir, prefix=inprefix, exclude_prefix=outprefix, sigma_rels=instd)
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
    named by ``list_snapshots(indir, inprefix, outprefix, instd)``). With ``skip_existing``, outputs already in
    ``outdir`` are left as they are.

    Each output's network is that of ``reconstructed_networks``; the rest of its snapshot dict (keys, loss,
    encoder, dataset_kwargs, as pickled) is the latest input's. Every input is read once per ``batch`` outputs.
    Returns a summary: paths written, inputs used, coefficients, seconds."""
    start = time.time()
    plan = plan_reconstruction(indir, outstd, outkimg, inprefix, instd, outprefix)
    out_paths = [os.path.join(outdir, snapshot_name(plan.out_nimg, std, outprefix)) for std in plan.outstd]
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
