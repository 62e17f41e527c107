"""Compute FID (and KID, FD-DINOv2) of images, or of a network's samples, against reference statistics.

  python fid.py ref  --data=DATASET_ZIP_OR_DIR --dest=REF.npz [--metrics=fid,fd_dinov2]
  python fid.py calc --images=DIR_OR_ZIP --ref=REF.npz_OR_URL_OR_DATASET [--num=50000]
  python fid.py calc --network=PKL --seeds=0-49999 --ref=...      (samples in memory, no PNGs written)
  python fid.py calc ... --metrics=fid,fd_dinov2 [--dinov2=PATH]  (EDM2's two metrics, one sampling pass)
  torchrun --standalone --nproc_per_node=8 fid.py calc ...         (features sharded over processes)

The FID detector is the standard Inception-v3 with NVIDIA's preprocessing (metrics/inception.py), FD-DINOv2's
is DINOv2 ViT-L/14 as in EDM2 (metrics/dinov2.py). The last line printed is the FID alone.
"""

from __future__ import annotations

import time

import click

import dnnlib
from torch_utils import distributed as dist
from training.cli_options import (fid_options, parse_class_option, parse_interval, precision_option, sampler_options,
                                  user_errors)


def _init_device(device: str | None):
    from training.perf import apply_process_settings, default_fast_paths
    try:
        device = dist.init(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    apply_process_settings(default_fast_paths(device))  # Retained host memory on the CPU; TF32 stays off.
    return device


def dinov2_option(fn):
    """--dinov2: where FD-DINOv2's weights come from."""
    from metrics.dinov2 import DINOV2_URL
    return click.option("--dinov2", metavar="PATH|URL", default=None,
                        help=f"DINOv2 ViT-L/14 weights for fd_dinov2  [default: {DINOV2_URL}, cached]")(fn)


def _open_dataset(path: str, max_size: int | None = None, seed: int = 0, min_size: int = 2):
    from training.data.dataset import open_image_dataset
    dataset = open_image_dataset(path, max_size=max_size, random_seed=seed)
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


def _cached_dataset_features(path: str, dataset, seed: int, detectors: dict, device, batch: int, workers: int):
    """The features of a dataset's images (the subset ``--num``/``--seed`` pick) for each detector (name ->
    features), cached by the dataset's content like reference statistics, so that evaluating the same real images
    again (a real-data floor) is free."""
    from metrics.evaluate import cached_dataset_references
    from metrics.reference import LAYOUTS
    subset = [f"subset={len(dataset)},{seed}"]
    ref = cached_dataset_references(path, detectors, lambda missing: _dataset_features(dataset, missing, device,
                                                                                       batch, workers),
                                    subset, keep_features=True)
    return {name: ref[LAYOUTS[name].key("features")] for name in detectors}


def _generated_features(net, decode, seeds: list[int], class_idx: int | str | None, sampler, detector,
                        device, batch: int):
    """Features of a network's samples (made pixels by ``decode``), made in memory exactly as generate.py makes its
    PNGs."""
    from training.sampling.generation import generated_features
    start = time.time()
    features = generated_features(net, seeds, detector, device, batch, class_idx=class_idx,
                                  sampler=sampler, decode=decode)
    dist.print0(_throughput(len(seeds), start))
    return features


def _throughput(num_images: int, start: float) -> str:
    seconds = max(time.time() - start, 1e-9)
    return f"Computed features of {num_images} images in {seconds:.1f} s ({num_images / seconds:.1f} images/s)"


METRICS_HELP = "Comma-separated: fid, kid, fd_dinov2"


@click.group()
def main():
    """FID and KID with the standard Inception detector, FD-DINOv2 with EDM2's DINOv2 ViT-L/14."""


@main.command()
@click.option("--data", required=True, metavar="ZIP|DIR", help="Dataset of reference images")
@click.option("--dest", required=True, metavar="NPZ|PKL", help="Where to write the statistics (.pkl: EDM2's format)")
@click.option("--metrics", "metric_names", default="fid", show_default=True,
              help=f"{METRICS_HELP}: whose statistics to compute")
@click.option("--features", "keep_features", is_flag=True, help="Also store the features (needed for KID)")
@click.option("--cache", type=bool, default=True, show_default=True, metavar="BOOL",
              help="Reuse the statistics computed earlier for the same images, detector and preprocessing")
@fid_options
@dinov2_option
def ref(data, dest, metric_names, keep_features, cache, batch, workers, detector, preprocess, device, dinov2):
    """Compute reference statistics (mu, sigma) of a dataset for each metric; with FID alone, in the official
    format."""
    from metrics.evaluate import cached_dataset_references, load_detectors, parse_metrics
    from metrics.reference import save_reference
    with user_errors():
        metrics = parse_metrics(metric_names)
        dataset = _open_dataset(data)
        device = _init_device(device)
        detectors = load_detectors(metrics, device, inception=detector, dinov2=dinov2, preprocess_mode=preprocess)
        statistics = cached_dataset_references(
            data, detectors, lambda missing: _dataset_features(dataset, missing, device, batch, workers),
            keep_features=keep_features or "kid" in metrics, cache=cache)
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


@main.command()
@click.option("--images", metavar="DIR|ZIP", help="Images to evaluate")
@click.option("--network", metavar="PKL|URL", help="Or: a network whose samples are evaluated in memory")
@click.option("--seeds", metavar="LIST", help="With --network: seeds, e.g. 0-49999  [default: 0..num-1]")
@click.option("--class", "class_idx", metavar="INT|balanced", callback=parse_class_option,
              help="With --network: class label, or 'balanced' (class = seed mod classes)  [default: random]")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|PKL|URL|ZIP|DIR",
              help="Reference statistics (ours, or EDM2's .pkl), or a dataset (its statistics are cached by content "
                   "hash)")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True, help="Number of images")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the subset when there are more images")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help=METRICS_HELP)
@click.option("--gnet", metavar="PKL|URL|uncond", help="With --network: guiding network (as generate.py's --gnet)")
@click.option("--guidance", metavar="LIST", default="1", show_default=True, callback=_guidance_weights,
              help="With --network: guidance weight w, or several to sweep, e.g. 1.0,1.2,...,3.0")
@click.option("--guidance-interval", "guidance_interval", metavar="LO,HI", help="Guide only for sigma in [LO, HI]",
              callback=lambda ctx, param, value: parse_interval(value))
@click.option("--plot", metavar="PNG", default="fid-vs-guidance.png", show_default=True,
              help="With several --guidance values: where to plot FID (and FD-DINOv2) against w")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="With --network: measure K disjoint seed sets (the seeds, then the seeds shifted by max + 1, ...) "
                   "and report the minimum, mean and spread (the paper: the minimum of three)")
@fid_options
@dinov2_option
@sampler_options
@precision_option
def calc(images, network, seeds, class_idx, ref_path, num, seed, metric_names, gnet, guidance, guidance_interval,
         plot, repeats, batch, workers, detector, preprocess, device, dinov2, precision=None, sampler=None):
    """Compute FID (and KID, FD-DINOv2) of images, or of a network's samples, against reference statistics.

    With --network, the sampler options are generate.py's, and the images are those generate.py would
    write for the same seeds, never written to disk; each image is sampled once for all the metrics.
    """
    from metrics.evaluate import cached_dataset_references, load_detectors, parse_metrics
    from training.sampling.generation import (GenerateOptions, load_guide, load_network_once_per_node,
                                              prepare_for_sampling)
    try:
        with user_errors():
            metrics = parse_metrics(metric_names)
            _check_calc_options(images, network, seeds, gnet, guidance, precision, repeats)
            seed_list = dnnlib.util.parse_int_list(seeds) if seeds is not None else list(range(num))
            ref = _reference_statistics(ref_path, metrics)
            dataset = _open_dataset(images, max_size=num, seed=seed, min_size=num) if images is not None else None
            device = _init_device(device)
            _check_precision(precision, device)
            # The network before the detector: a snapshot that cannot be sampled stops the run before other work.
            options = GenerateOptions(network=network, seeds=seed_list, gnet=gnet, precision=precision,
                                      guidance=max(guidance, key=lambda w: w != 1))
            sampled, decode = (None, None) if network is None else load_network_once_per_node(network, device)
            if sampled is not None:
                sampled = prepare_for_sampling(sampled, options, device)
            detectors = load_detectors(metrics, device, inception=detector, dinov2=dinov2, preprocess_mode=preprocess)
            if ref is None:
                ref_dataset = _open_dataset(ref_path)
                ref = cached_dataset_references(
                    ref_path, detectors,
                    lambda missing: _dataset_features(ref_dataset, missing, device, batch, workers),
                    keep_features="kid" in metrics)
            if dataset is not None:
                _print_results(_measure_images(images, dataset, seed, detectors, ref, metrics, device, batch, workers))
                return
            sampling = _Sampling(sampled, decode, class_idx, sampler, guidance_interval, detectors, device,
                                 batch)
            guide = load_guide(options, sampled, device)
            if repeats > 1:
                _print_results(_report_repeats(sampling.repeats(guide, guidance[0], seed_list, repeats, ref, metrics),
                                               seed_list))
            elif len(guidance) > 1:
                _report_guidance_sweep(sampling.per_weight(guide, guidance, seed_list, ref, metrics), plot,
                                       len(seed_list))
            else:
                _print_results(sampling.per_weight(guide, guidance, seed_list, ref, metrics)[guidance[0]])
    finally:
        dist.shutdown()


def _check_calc_options(images, network, seeds, gnet, guidance: list[float], precision, repeats: int) -> None:
    """The options of ``calc`` that only go with one of its modes, one line each."""
    if network is None and (gnet is not None or guidance != [1.0] or precision is not None):
        raise click.ClickException("--gnet, --guidance and --precision go with --network")
    if (images is None) == (network is None):
        raise click.ClickException("give either --images=DIR|ZIP or --network=PKL (with --seeds)")
    if seeds is not None and network is None:
        raise click.ClickException("--seeds goes with --network; with --images use --num and --seed")
    if repeats > 1 and (network is None or len(guidance) > 1):
        raise click.ClickException(f"--repeats={repeats} goes with --network and one --guidance weight")


def _reference_statistics(ref_path: str, metrics: list[str]):
    """The statistics of a --ref file, checked to hold what ``metrics`` need; None for a dataset (measured later)."""
    from metrics.evaluate import check_reference_for
    from metrics.reference import is_statistics_file, load_reference
    if not is_statistics_file(ref_path):
        return None
    ref = load_reference(ref_path)
    try:
        check_reference_for(ref, metrics)
    except ValueError as e:
        raise click.ClickException(f"--ref={ref_path}: {e}") from None
    return ref


def _check_precision(precision: str | None, device) -> None:
    from training.perf import check_precision
    try:
        check_precision(precision, device)
    except ValueError as e:
        raise click.ClickException(f"--precision={precision}: {e}") from None


def _measure_images(images: str, dataset, seed: int, detectors: dict, ref, metrics: list[str], device, batch: int,
                    workers: int) -> dict[str, float]:
    """calc --images: the metrics of (a subset of) a folder or ZIP of images."""
    from metrics.evaluate import compute_metrics
    return compute_metrics(_cached_dataset_features(images, dataset, seed, detectors, device, batch, workers), ref,
                           metrics)


class _Sampling:
    """calc --network: the network's samples for a seed list, measured in memory (as generate.py would write them)."""

    def __init__(self, net, decode, class_idx, sampler, interval, detectors: dict, device, batch: int):
        self.net, self.decode, self.class_idx, self.sampler = net, decode, class_idx, sampler
        self.interval, self.detectors, self.device, self.batch = interval, detectors, device, batch

    def metrics(self, guide, weight: float, seeds: list[int], ref, metrics: list[str]) -> dict[str, float]:
        from metrics.evaluate import compute_metrics
        from training.sampling import guided
        features = _generated_features(guided(self.net, guide, weight, self.interval), self.decode, seeds,
                                       self.class_idx, self.sampler, self.detectors, self.device, self.batch)
        return compute_metrics(features, ref, metrics)

    def repeats(self, guide, weight: float, seeds: list[int], repeats: int, ref,
                metrics: list[str]) -> list[dict[str, float]]:
        """--repeats=K: the metrics of K disjoint seed sets."""
        return [self.metrics(guide, weight, seed_set, ref, metrics) for seed_set in disjoint_seed_sets(seeds, repeats)]

    def per_weight(self, guide, weights: list[float], seeds: list[int], ref, metrics: list[str]) -> dict:
        """The metrics at each guidance weight, each printed as it comes when there are several."""
        results = {}
        for w in weights:
            results[w] = self.metrics(guide, w, seeds, ref, metrics)
            if len(weights) > 1:
                dist.print0(f"guidance {w:g}: " + ", ".join(f"{k.upper()} {v:g}" for k, v in results[w].items()))
        return results


def disjoint_seed_sets(seeds: list[int], repeats: int) -> list[list[int]]:
    """``repeats`` seed sets: ``seeds``, then ``seeds`` shifted by (max + 1), 2 (max + 1), ...: disjoint, the same size."""
    shift = max(seeds) + 1
    return [[s + k * shift for s in seeds] for k in range(repeats)]


def _report_repeats(per_repeat: list[dict[str, float]], seeds: list[int]) -> dict[str, float]:
    """One line per seed set, then each metric's minimum, mean and standard deviation (ddof 1) over the sets; returns
    the minimum of each, as the paper reports FID (the minimum of three 50,000-image sets)."""
    import numpy as np
    for k, values in enumerate(per_repeat):
        first, last = seeds[0] + k * (max(seeds) + 1), seeds[-1] + k * (max(seeds) + 1)
        dist.print0(f"seeds {first}..{last}: " + ", ".join(f"{n.upper()} {v:g}" for n, v in values.items()))
    summary = {}
    for name in per_repeat[0]:
        values = np.array([r[name] for r in per_repeat])
        summary[name] = float(values.min())
        dist.print0(f"{name.upper()} over {len(values)} seed sets: min {values.min():g}, mean {values.mean():g}, "
                    f"std {values.std(ddof=1):g}")
    return summary


def _report_guidance_sweep(per_weight: dict[float, dict[str, float]], plot: str, num_images: int) -> None:
    """The FID (and FD-DINOv2) of each guidance weight as a table, the best weight of each, and a plot of each
    against w (main process). EDM2 tunes the weight for each metric apart (its presets ``*-guid-fid``,
    ``*-guid-dino``)."""
    names = [name for name in ("fid", "fd_dinov2") if all(name in r for r in per_weight.values())]
    if not names or not dist.is_main():
        return
    labels = {name: name.upper() for name in names}
    best = {name: min(per_weight, key=lambda w: per_weight[w][name]) for name in names}

    def row(w: float) -> str:
        marks = [labels[name] for name in names if best[name] == w]
        return (f"  {w:8g}" + "".join(f"  {per_weight[w][name]:{max(8, len(labels[name]))}.3f}" for name in names)
                + (f"  <- best {', '.join(marks)}" if marks else ""))

    print("\n  guidance" + "".join(f"  {labels[name]:>8s}" for name in names) + "\n"
          + "\n".join(row(w) for w in per_weight))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.images import save_figure
    fig, axes = plt.subplots(len(names), 1, figsize=(6.4, 4.0 * len(names)), dpi=120, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        values = [per_weight[w][name] for w in per_weight]
        w_best, v_best = best[name], per_weight[best[name]][name]
        ax.plot(list(per_weight), values, "o-", markersize=4)
        ax.plot([w_best], [v_best], "*", color="tab:red", markersize=14,
                label=f"best: w {w_best:g}, {labels[name]} {v_best:.3f}")
        ax.set_ylabel(f"{labels[name]} ({num_images} images)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("guidance weight w")
    fig.tight_layout()
    save_figure(fig, plot)
    for name in names:
        print(f"Best guidance {best[name]:g} ({labels[name]} {per_weight[best[name]][name]:.3f}) of {len(per_weight)}; "
              f"plot in {plot}")


def _print_results(results: dict[str, float]) -> None:
    """Every metric as 'name: value'; the FID, if computed, last and alone on its line."""
    for name, value in results.items():
        if name != "fid":
            dist.print0(f"{name.upper()}: {value:g}")
    if "fid" in results:
        dist.print0(f"{results['fid']:g}")


if __name__ == "__main__":
    main()
