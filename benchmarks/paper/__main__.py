"""The paper in miniature: Table 2, Figure 2 and the stochastic sampler's S_churn curve, on the embedded
Fashion-MNIST, one command each (docs/paper-miniature.md).

    python -m benchmarks.paper table2 --size=cpu     # configs A-F x 3 seeds, FID at NFE 35
    python -m benchmarks.paper fig2 --size=cpu       # FID against NFE per sampler step, VP and EDM networks
    python -m benchmarks.paper fig5b --size=cpu       # FID against S_churn
    python -m benchmarks.paper all --size=cpu        # the three, about two hours on two CPU cores

Every command is resumable: run it again and finished pieces are skipped. --size=gpu is bigger (more images, a
wider network) for one GPU; --size=smoke runs everything at toy size in a minute or two (CI).
"""

from __future__ import annotations

import os
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.paper import experiments  # noqa: E402
from benchmarks.paper.configs import SIZES, TABLE2, with_training_length  # noqa: E402
from benchmarks.paper.pieces import Workspace  # noqa: E402


def common_options(fn):
    for option in reversed([
        click.option("--size", type=click.Choice(list(SIZES)), default=None,
                     help="Experiment size  [default: gpu where CUDA is available, else cpu]"),
        click.option("--outdir", metavar="DIR", default=None,
                     help="Output folder, one per size; rerunning into it skips finished pieces  "
                          "[default: paper-miniature/<size>]"),
        click.option("--device", metavar="DEV", default=None, help="cpu, cuda, cuda:1  [default: CUDA if available]"),
        click.option("--kimg", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Train every network on this many thousand images instead of the size's  "
                          "[default: the size's; its folder is then paper-miniature/<size>-<kimg>kimg]"),
    ]):
        fn = option(fn)
    return fn


def open_workspace(size: str | None, outdir: str | None, device: str | None, kimg: float | None) -> Workspace:
    """The device (picked automatically unless given), the size (with its training length changed by --kimg), and
    the prepared output folder."""
    import torch
    from torch_utils import distributed as dist

    try:
        picked = dist.init(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    chosen = SIZES[size or ("gpu" if picked.type == "cuda" else "cpu")]
    if kimg is not None:
        try:
            chosen = with_training_length(chosen, kimg)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    ws = Workspace(outdir or os.path.join("paper-miniature", chosen.name), chosen, picked)
    click.echo(f"Size '{chosen.name}' ({chosen.kimg:g} kimg per network) on {picked} "
               f"({torch.get_num_threads()} CPU threads); output in {ws.outdir}")
    try:
        ws.prepare()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return ws


def run_experiments(ws: Workspace, names: list[str], **kwargs) -> None:
    start = time.time()
    lines = []
    for name in names:
        summary = experiments.EXPERIMENTS[name](ws, **kwargs.get(name, {}))
        lines.append(summary.line(name))
        click.echo(lines[-1] + "; " + ", ".join(experiments.outputs(ws, name)))
    if len(names) > 1:
        click.echo(f"Done: {'; '.join(lines)}; {(time.time() - start) / 60:.1f} min in all")


@click.group()
def main():
    """The paper's Table 2, Figure 2 and stochastic sampling in miniature, on the embedded Fashion-MNIST."""


@main.command()
@common_options
def table2(size, outdir, device, kimg):
    """Table 2: configs A-F, each trained with every seed on the same number of images, FID at NFE 35."""
    run_experiments(open_workspace(size, outdir, device, kimg), ["table2"])


@main.command()
@common_options
def fig2(size, outdir, device, kimg):
    """Figure 2: FID against NFE for the VP baseline (A) and the EDM network (F), per sampler improvement."""
    run_experiments(open_workspace(size, outdir, device, kimg), ["fig2"])


@main.command()
@common_options
@click.option("--config", type=click.Choice(list(TABLE2)), default=experiments.FIG5B_DEFAULT_CONFIG,
              show_default=True, help="The network: Table 2's config (its first training seed)")
def fig5b(size, outdir, device, kimg, config):
    """Stochastic sampling (Section 4): FID against S_churn of Algorithm 2 for one network."""
    run_experiments(open_workspace(size, outdir, device, kimg), ["fig5b"], fig5b=dict(config=config))


@main.command(name="all")
@common_options
def run_all(size, outdir, device, kimg):
    """Table 2, then Figure 2, then Figure 5b (which reuse Table 2's networks)."""
    run_experiments(open_workspace(size, outdir, device, kimg), list(experiments.EXPERIMENTS))


if __name__ == "__main__":
    main()
