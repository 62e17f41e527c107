"""Reconstruct post-hoc EMA networks (EDM2, Karras et al. 2024, Section 3) from the raw EMA snapshots of a
training run: any sigma_rel, as of the time of any snapshot.

Examples:

    # sigma_rel 0.050, 0.075, ..., 0.250 at the latest snapshot of a run, reading the snapshots 2 times
    python reconstruct_phema.py --indir=training-runs/00000-edm2 --outdir=phema --outstd=0.050,0.075,...,0.250

    # sigma_rel 0.130 as of the snapshot at 2147 kimg, from the official release's raw snapshots
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=phema --outstd=0.13 --outkimg=2147

Inputs are the files PREFIX-KKKKKKK-S.SSS.pkl (KKKKKKK = thousands of images, S.SSS = sigma_rel; our training
loop's are network-snapshot-*, the official release's are named after the model); outputs are
phema-KKKKKKK-S.SSS.pkl in the format of the latest input. The options are the official script's.
"""

from __future__ import annotations

import math
import os
import pickle

import click

from training.ema.reconstruct import reconstruct
from training.cli_options import sigma_rel_list_option
from training.run_files import PHEMA_PREFIX, format_kimg


@click.command()
@click.option("--indir", help="Folder of raw EMA snapshots PREFIX-KKKKKKK-S.SSS.pkl", metavar="DIR", required=True)
@click.option("--inprefix", help="Only inputs with this prefix  [default: any but --outprefix]", metavar="STR")
@click.option("--instd", help="Only inputs of these sigma_rel  [default: all]", metavar="LIST", callback=sigma_rel_list_option)
@click.option("--outdir", help="Where to write the reconstructions", metavar="DIR", required=True)
@click.option("--outprefix", help="Prefix of the output files", metavar="STR", default=PHEMA_PREFIX, show_default=True)
@click.option("--outstd", help="sigma_rel of each output: a list, '...' for a range (0.05,0.10,...,0.25)",
              metavar="LIST", required=True, callback=sigma_rel_list_option)
@click.option("--outkimg", metavar="KIMG",
              help="Reconstruct as of the snapshot at this time: its name's KKKKKKK, or exact (16.032)  "
              "[default: the latest]",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--skip", "skip_existing", help="Leave outputs that already exist as they are", is_flag=True)
@click.option("--batch", help="Outputs made per pass over the inputs (each pass reads every input once)",
              metavar="INT", type=click.IntRange(min=1), default=8, show_default=True)
def main(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip_existing, batch):
    """Post-hoc EMA: least-squares combinations of the tracked power-function EMAs (Appendix C)."""
    try:
        summary = reconstruct(indir=indir, outdir=outdir, outstd=outstd, outkimg=outkimg, batch=batch,
                              inprefix=inprefix, instd=instd, outprefix=outprefix, skip_existing=skip_existing)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    stds = ", ".join(f"{std:.3f}" for std in summary["outstd"])
    passes = math.ceil(len(summary["paths"]) / batch)
    skipped = f", {len(summary['skipped'])} left as they were" if summary["skipped"] else ""
    click.echo(f"Reconstructed {len(summary['paths'])} network(s) (sigma_rel {stds} at "
               f"{format_kimg(summary['out_nimg'])} kimg{skipped}) from {len(summary['inputs'])} snapshots, "
               f"{passes} pass(es), in {summary['seconds']:.1f} s -> {os.path.join(outdir, '')}")


if __name__ == "__main__":
    main()
