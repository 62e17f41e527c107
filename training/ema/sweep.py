"""FID against the EMA length, chosen after training: the sweep of EDM2 (Karras et al., "Analyzing and Improving
the Training Dynamics of Diffusion Models", CVPR 2024, Section 3: the quality of a run depends strongly on the EMA
length, and post-hoc EMA lets it be chosen after training).

For each sigma_rel, the post-hoc EMA network is reconstructed in memory from a run's raw EMA snapshots
(``training.ema``: the least-squares weights of Algorithm 3, the weighted average of Appendix C), its samples are
made as ``generate.py`` makes them (same seeds, same sampler options) and measured as ``fid.py calc --network``
measures them (same detector, same reference handling). So the FID reported for a sigma_rel is the one ``fid.py``
gives for the pickle ``reconstruct_phema.py`` writes for it. Under torchrun the images of each sigma_rel are shared
among the processes and their features gathered on all; the main process computes the FID and writes the files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

import dnnlib
from torch_utils import distributed
from training.ema.phema import SIGMA_REL_MAX
from training.ema.reconstruct import PosthocPlan, plan_reconstruction, reconstruct, reconstructed_networks
from training.images import save_figure
from training.run_files import format_kimg
from training.sampling.spec import PaperSampler, SamplerSpec, spec_record

SWEEP_JSON, SWEEP_PNG = "ema-sweep.json", "ema-sweep.png"


@dataclass
class EMASweepOptions:
    indir: str                            # folder of a run's raw EMA snapshots PREFIX-KKKKKKK-S.SSS.pkl
    ref: str                              # reference statistics (.npz path or URL), or a dataset ZIP or folder
    outstd: list[float]                   # sigma_rel to evaluate, each in (0, 0.3003]
    outkimg: float | None = None          # as of the snapshot at this kimg; None: the latest
    seeds: list[int] = field(default_factory=lambda: list(range(10000)))  # one image per seed, per sigma_rel
    class_idx: int | str | None = None    # None: a random class per seed; "balanced": seed mod classes
    sampler: SamplerSpec = PaperSampler()  # training.sampling.spec
    batch: int = 64                       # images per batch per process (sampling and detector)
    workers: int = 2                      # data-loading processes for a dataset reference
    detector: str | None = None           # FID Inception weights (path or URL); None: metrics.detector's default
    preprocess: str = "nvidia"            # the detector's resize and scaling
    device: str | None = None             # None: this process's GPU, else the CPU
    inprefix: str | None = None           # only raw snapshots of this prefix; None: any but 'phema'
    instd: list[float] | None = None      # only raw snapshots of these sigma_rel; None: all
    reconstruct_batch: int = 8            # networks reconstructed per pass over the snapshots (memory: one each)
    json_path: str | None = None          # None: INDIR/ema-sweep.json
    plot_path: str | None = None          # None: INDIR/ema-sweep.png
    save_best: bool = False               # also write phema-KKKKKKK-S.SSS.pkl of the best sigma_rel to INDIR


def check_options(options: EMASweepOptions) -> None:
    """Raise ValueError naming the option for inputs that cannot work, before any work starts."""
    if not options.outstd:
        raise ValueError("--outstd: no sigma_rel given")
    outside = [std for std in options.outstd if not 0 < std <= SIGMA_REL_MAX]
    if outside:
        raise ValueError(f"--outstd: each sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}]; got {outside[0]:g}")
    if len(options.seeds) < 2:
        raise ValueError(f"--seeds: FID needs at least 2 images, got {len(options.seeds)}")
    if min(options.seeds) < 0:
        raise ValueError(f"--seeds: seeds must be non-negative, got {min(options.seeds)}")
    if options.batch < 1:
        raise ValueError(f"--batch={options.batch}: must be at least 1")
    if options.reconstruct_batch < 1:
        raise ValueError(f"reconstruct_batch={options.reconstruct_batch}: must be at least 1")


def format_int_list(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8': the inverse of ``dnnlib.util.parse_int_list`` for a sorted list."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            parts.append(f"{values[start]}" if i - 1 == start else f"{values[start]}-{values[i - 1]}")
            start = i
    return ",".join(parts)


def sigma_rel_key(sigma_rel: float) -> str:
    """A sigma_rel as a JSON key: its shortest decimal form ('0.05', '0.125')."""
    return format(sigma_rel, "g")


def _check_run(plan: PosthocPlan, options: EMASweepOptions, device: torch.device):
    """The decoder of the run's samples (``snapshot_decoder``: pixels, or latents through the run's VAE), from the
    latest snapshot (whose non-network parts a phema pickle keeps), checked to take ``--class``."""
    from training.checkpoint import load_network_pkl
    from training.sampling.generation import GenerateOptions, check_network_options, snapshot_decoder
    latest = plan.inputs[-1][0]
    snapshot = load_network_pkl(latest)
    check_network_options(snapshot["ema"], GenerateOptions(network=latest, seeds=options.seeds,
                                                           class_idx=options.class_idx))
    return snapshot_decoder(snapshot, latest, device)


def _open_reference(ref: str):
    """Reference statistics read now, or the dataset to compute them from (opened now, so that a missing one is
    reported before any work)."""
    from metrics.reference import is_statistics_file, load_reference
    from training.data.dataset import open_image_dataset
    if is_statistics_file(ref):
        return load_reference(ref), None
    dataset = open_image_dataset(ref)
    if len(dataset) < 2:
        raise ValueError(f"{ref}: found {len(dataset)} images, but a reference needs at least 2")
    return None, dataset


def _dataset_reference(ref: str, dataset, detector, device: torch.device, options: EMASweepOptions) -> dict:
    """The statistics of a dataset reference, cached as ``fid.py calc --ref=DATASET`` caches them."""
    from metrics.evaluate import cached_dataset_reference, detector_settings
    from metrics.features import compute_features, dataset_batches

    def features() -> np.ndarray:
        return compute_features(detector, dataset_batches(dataset, options.workers), len(dataset), options.batch,
                                device, desc=f"Features of {dataset.name}")

    return cached_dataset_reference(ref, features, detector_settings(detector))


def _fid_on_main(features: np.ndarray, ref: dict, device: torch.device) -> float:
    """FID of ``features`` against ``ref``, computed by the main process alone (its 2048x2048 eigendecompositions
    take seconds of CPU, which the other processes would otherwise fight over) and shared with all."""
    from metrics.evaluate import compute_metrics
    value, error = 0.0, None
    if distributed.is_main():
        try:
            value = compute_metrics(features, ref, ["fid"])["fid"]
        except (ValueError, np.linalg.LinAlgError) as e:
            error = e  # Raised after the exchange, so that no process is left waiting for it.
    shared = torch.tensor([value, error is not None], dtype=torch.float64, device=device)
    value, failed = distributed.all_reduce_sum(shared).tolist()
    if error is not None:
        raise error
    if failed:
        raise ValueError("the main process could not compute the FID")
    return value


def ema_sweep(options: EMASweepOptions) -> dict:
    """FID of the post-hoc EMA network of each sigma_rel in ``options.outstd`` (EDM2 Section 3): prints one line per
    sigma_rel as it goes, writes the JSON and the plot (and with ``save_best`` the best network's pickle) on the
    main process, and returns the results on every process: ``fid`` (sigma_rel key -> FID), ``best``, the
    settings, the files written and the seconds taken. Works alone or under torchrun."""
    start = time.time()
    check_options(options)
    plan = plan_reconstruction(options.indir, options.outstd, options.outkimg, options.inprefix, options.instd)
    decode = _check_run(plan, options, "cpu")  # Before any measuring; a VAE moves to the device when first used.
    device, detector, ref = _open_measurement(options)
    if distributed.is_main():
        print(f"EMA sweep of {options.indir}: {len(plan.outstd)} sigma_rel at {format_kimg(plan.out_nimg)} kimg "
              f"from {len(plan.inputs)} snapshots, {len(options.seeds)} images each, "
              f"{distributed.get_world_size()} process(es) on {device}")
    fids = _measure_each_sigma_rel(plan, options, device, detector, ref, decode)
    result = _summary(plan, options, detector, fids)
    if distributed.is_main():
        result["seconds"] = time.time() - start
        write_json(result, result["json"])
        plot_sweep(result, result["plot"])
        if options.save_best:
            result["best_pkl"] = reconstruct(options.indir, options.indir, [result["best"]["sigma_rel"]],
                                             outkimg=options.outkimg, batch=1, inprefix=options.inprefix,
                                             instd=options.instd, progress=False)["paths"][0]
    distributed.barrier()
    result["seconds"] = time.time() - start
    return result


def _open_measurement(options: EMASweepOptions) -> tuple[torch.device, object, dict]:
    """(device, FID detector, reference statistics), as ``fid.py calc`` opens them; every process calls it."""
    from metrics.detector import load_detector
    from training.perf import apply_process_settings, default_fast_paths

    ref, ref_dataset = _open_reference(options.ref)
    try:
        device = distributed.init(options.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    apply_process_settings(default_fast_paths(device))  # As fid.py: retained host memory on the CPU, TF32 off.
    detector = load_detector(options.detector, device=device, preprocess_mode=options.preprocess)
    if ref is None:
        ref = _dataset_reference(options.ref, ref_dataset, detector, device, options)
    return device, detector, ref


def _measure_each_sigma_rel(plan: PosthocPlan, options: EMASweepOptions, device: torch.device, detector,
                            ref: dict, decode) -> dict[float, float]:
    """FID of each reconstructed network (sigma_rel -> FID), one line each on the main process."""
    from training.sampling.generation import generated_features

    main = distributed.is_main()
    fids: dict[float, float] = {}
    bar = tqdm(total=len(plan.outstd), unit="sigma_rel", desc="EMA sweep", disable=not main)
    for sigma_rel, net in reconstructed_networks(plan, batch=options.reconstruct_batch, progress=False):
        begin = time.time()
        net = net.to(device).eval()
        features = generated_features(net, options.seeds, detector, device, options.batch,
                                      class_idx=options.class_idx, sampler=options.sampler,
                                      desc=f"sigma_rel {sigma_rel:.3f}", decode=decode)
        fids[sigma_rel] = _fid_on_main(features, ref, device)
        if main:
            bar.write(f"sigma_rel {sigma_rel:.3f}: FID {fids[sigma_rel]:.4f}  ({time.time() - begin:.1f} s)")
        bar.update(1)
    bar.close()
    return fids


def _summary(plan: PosthocPlan, options: EMASweepOptions, detector, fids: dict[float, float]) -> dict:
    """The results and settings that the JSON holds and ``ema_sweep`` returns."""
    best = min(fids, key=fids.get)
    return dict(
        indir=options.indir, ref=options.ref, kimg=plan.out_nimg // 1000, nimg=plan.out_nimg,
        inputs=[os.path.basename(path) for path, _ in plan.inputs],
        tracked_stds=sorted({name.sigma_rel for _, name in plan.inputs}),
        num_images=len(options.seeds), seeds=format_int_list(sorted(options.seeds)), class_idx=options.class_idx,
        sampler=spec_record(options.sampler),
        detector=detector.weights_sha256, preprocess=options.preprocess, world_size=distributed.get_world_size(),
        fid={sigma_rel_key(std): fid for std, fid in fids.items()},
        best=dict(sigma_rel=best, fid=fids[best]),
        json=options.json_path or os.path.join(options.indir, SWEEP_JSON),
        plot=options.plot_path or os.path.join(options.indir, SWEEP_PNG),
        best_pkl=None)


def write_json(result: dict, path: str) -> None:
    """The sweep's results and settings as JSON (``fid``: sigma_rel key -> FID), written atomically."""
    data = json.dumps(_finite({k: v for k, v in result.items() if k != "json"}), indent=2, allow_nan=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.atomic_write_bytes(path, (data + "\n").encode())


def _finite(value):
    """JSON has no infinity (S_max's default): non-finite floats as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def plot_sweep(result: dict, path: str) -> None:
    """FID against sigma_rel as EDM2 plots its EMA sweeps, the best marked, the sigma_rel tracked in training
    dotted."""
    import matplotlib
    matplotlib.use("Agg")  # No display needed; a no-op when pyplot already runs with another backend.
    import matplotlib.pyplot as plt

    stds = [float(key) for key in result["fid"]]
    fids = list(result["fid"].values())
    best = result["best"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for i, std in enumerate(result["tracked_stds"]):
        ax.axvline(std, color="0.7", linestyle=":", linewidth=1, label="tracked in training" if i == 0 else None)
    ax.plot(stds, fids, "o-", color="tab:blue", markersize=4, label="post-hoc EMA")
    ax.plot([best["sigma_rel"]], [best["fid"]], "*", color="tab:red", markersize=14,
            label=f"best: sigma_rel {best['sigma_rel']:.3f}, FID {best['fid']:.3f}")
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel(f"FID ({result['num_images']} images)")
    ax.set_title(f"{os.path.basename(os.path.normpath(result['indir']))} at {result['kimg']} kimg")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def format_table(result: dict) -> str:
    """The FIDs as a two-column table, the best one marked."""
    best = sigma_rel_key(result["best"]["sigma_rel"])
    lines = ["sigma_rel        FID"]
    for key, fid in result["fid"].items():
        lines.append(f"{float(key):9.3f} {fid:10.4f}{'  <- best' if key == best else ''}")
    return "\n".join(lines)
