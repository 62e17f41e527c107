"""Benchmark the fast paths side by side: training, sampling (NFE 35), denoiser, FID-feature and data-loading
throughput, peak memory. A thin command line over benchmarks/suite.py; see README.md, section Performance, and
docs/performance.md.

Examples:

    # The official CIFAR-10 DDPM++ on a GPU: the official way, this repository's defaults, and more
    python benchmarks/benchmark.py --config=cifar10-ddpmpp --batch=64 \\
        --variants=reference,default,default+bf16,default+compile,default+bf16+compile,default+fp16 --out=bench.json

    # A quarter-width DDPM++ on a CPU, one thread
    python benchmarks/benchmark.py --device=cpu --threads=1 --config=cifar10-ddpmpp-c32 --batch=16 \\
        --variants=reference,default,default+bf16,default+bf16+compile --out=bench-cpu.json
"""

from __future__ import annotations

import json
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script from anywhere.

from benchmarks.suite import CONFIGS, MEASUREMENTS, Settings, format_table, run_benchmark  # noqa: E402
from dnnlib.util import atomic_write_bytes  # noqa: E402
from torch_utils.distributed import pick_device  # noqa: E402
from training.sampling.time_steps import DEFAULT_NUM_STEPS  # noqa: E402


def _csv(ctx, param, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("give at least one item")
    return items


@click.command()
@click.option("--config", help="Network to measure", type=click.Choice(list(CONFIGS)), default="cifar10-ddpmpp-c32",
              show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1, ...  [default: cuda if available]", metavar="DEVICE")
@click.option("--batch", help="Images per training step, forward pass, sampler batch and data batch", metavar="INT",
              type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--variants", help="Comma-separated fast-path variants: reference, default, and '+flag' additions "
              "(sdpa, channels_last, fused_adam, compile, tf32, bf16, fp16, no_<flag>)", metavar="LIST",
              default="reference,default,default+bf16", show_default=True, callback=_csv)
@click.option("--measure", help=f"What to measure ({', '.join(MEASUREMENTS)})", metavar="LIST",
              default=",".join(MEASUREMENTS), show_default=True, callback=_csv)
@click.option("--steps", "num_steps", help="Sampler steps (NFE = 2 steps - 1)", metavar="INT",
              type=click.IntRange(min=2), default=DEFAULT_NUM_STEPS, show_default=True)
@click.option("--fid-batch", help="Images per FID-feature batch", metavar="INT", type=click.IntRange(min=1),
              default=8, show_default=True)
@click.option("--rounds", help="Timed rounds (the median is reported)", metavar="INT", type=click.IntRange(min=1),
              default=3, show_default=True)
@click.option("--data", help="Dataset ZIP or folder for the data measurement  [default: random images]",
              metavar="ZIP|DIR")
@click.option("--workers", help="DataLoader processes for the data measurement (train.py --workers)", metavar="INT",
              type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", help="CPU threads for PyTorch  [default: PyTorch's]", metavar="INT",
              type=click.IntRange(min=1))
@click.option("--out", help="Write the results as JSON here", metavar="JSON")
def main(config, device, batch, variants, measure, num_steps, fid_batch, rounds, data, workers, threads, out):
    """Measure training, sampling, FID-feature and data-loading throughput and peak memory of fast-path
    variants."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = pick_device(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    settings = Settings(config=config, device=str(device), batch=batch, num_steps=num_steps, fid_batch=fid_batch,
                        rounds=rounds, measurements=tuple(measure), data=data, workers=workers)
    try:
        report = run_benchmark(variants, settings, progress=lambda line: click.echo(line, err=True))
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{report['config']} on {report['device_name']} ({report['device']}), batch {batch}, "
               f"torch {report['torch']}, median of {rounds} rounds")
    click.echo(format_table(report))
    if out:
        try:
            atomic_write_bytes(out, json.dumps(report, indent=2).encode())
        except OSError as e:
            raise click.ClickException(f"--out={out}: cannot write ({e.strerror or e})") from None
        click.echo(f"Wrote {out}")


if __name__ == "__main__":
    main()
