"""Choose the EMA length after training: FID of the post-hoc EMA network of each sigma_rel (EDM2, Karras et al.
2024, Section 3), printed, written as JSON and plotted.

Examples:

    # sigma_rel 0.010, 0.020, ..., 0.250 at the latest snapshot of a run, 10k images each
    python ema_sweep.py --indir=training-runs/00000-edm2 --ref=fid-refs/cifar10-32x32.npz \\
        --outstd=0.010,0.020,...,0.250

    # On 8 GPUs, as of the snapshot at 2048 kimg, 50k images each, and keep the best network
    torchrun --standalone --nproc_per_node=8 -- ema_sweep.py --indir=training-runs/00000-edm2 \\
        --ref=datasets/cifar10-32x32.zip --outstd=0.05,0.075,...,0.2 --outkimg=2048 --num=50000 --save-best=1

Each sigma_rel is reconstructed in memory from the run's raw snapshots (as reconstruct_phema.py does), sampled
as generate.py samples (same seeds and sampler options) and measured as fid.py calc measures. Writes
INDIR/ema-sweep.json (sigma_rel -> FID and the settings) and INDIR/ema-sweep.png unless --json/--plot say
otherwise; with --save-best=1 also the best network as INDIR/phema-KKKKKKK-S.SSS.pkl.
"""

from __future__ import annotations

import click

from torch_utils import distributed
from training.cli_options import (fid_options, parse_class_option, parse_seeds, sampler_options,
                                  sigma_rel_list_option, user_errors)


@click.command()
@click.option("--indir", help="The run's folder of raw EMA snapshots PREFIX-KKKKKKK-S.SSS.pkl", metavar="DIR",
              required=True)
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL|ZIP|DIR",
              help="Reference statistics, or a dataset (its statistics are cached by content hash)")
@click.option("--outstd", help="sigma_rel to evaluate: a list, '...' for a range (0.010,0.020,...,0.250)",
              metavar="LIST", required=True, callback=sigma_rel_list_option)
@click.option("--outkimg", metavar="KIMG",
              help="As of the snapshot at this time: its name's KKKKKKK, or exact (16.032)  [default: the latest]",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--inprefix", help="Only raw snapshots with this prefix  [default: any but phema]", metavar="STR")
@click.option("--instd", help="Only raw snapshots of these sigma_rel  [default: all]", metavar="LIST",
              callback=sigma_rel_list_option)
@click.option("--num", type=click.IntRange(min=2), help="Images per sigma_rel, seeds 0..num-1  [default: 10000]")
@click.option("--seeds", metavar="LIST", callback=parse_seeds, help="Or: these seeds, e.g. 0-49999, one image each")
@click.option("--class", "class_idx", metavar="INT|balanced", callback=parse_class_option,
              help="Class label of every image, or 'balanced' (class = seed mod classes)  [default: random]")
@click.option("--plot", "plot_path", metavar="PNG", help="FID against sigma_rel  [default: INDIR/ema-sweep.png]")
@click.option("--json", "json_path", metavar="JSON", help="Results and settings  [default: INDIR/ema-sweep.json]")
@click.option("--save-best", "save_best", metavar="BOOL", type=bool, default=False, show_default=True,
              help="Also write the best sigma_rel's network to INDIR/phema-KKKKKKK-S.SSS.pkl")
@fid_options
@sampler_options
def main(indir, ref_path, outstd, outkimg, inprefix, instd, num, seeds, class_idx, plot_path, json_path, save_best,
         batch, workers, detector, preprocess, device, sampler):
    """FID against sigma_rel of the post-hoc EMA, to choose the EMA length after training."""
    from training.ema.sweep import EMASweepOptions, ema_sweep, format_table
    if seeds is not None and num is not None and len(seeds) != num:
        raise click.ClickException(f"--num={num} and --seeds ({len(seeds)} seeds) disagree; give one of them")
    seeds = seeds if seeds is not None else list(range(num or 10000))
    options = EMASweepOptions(indir=indir, ref=ref_path, outstd=outstd, outkimg=outkimg, seeds=seeds,
                              class_idx=class_idx, sampler=sampler, batch=batch, workers=workers,
                              detector=detector, preprocess=preprocess, device=device, inprefix=inprefix,
                              instd=instd, json_path=json_path, plot_path=plot_path, save_best=save_best)
    try:
        with user_errors():
            result = ema_sweep(options)
        best = result["best"]
        written = ", ".join(p for p in (result["json"], result["plot"], result["best_pkl"]) if p)
        distributed.print0(format_table(result))
        distributed.print0(f"Best: sigma_rel {best['sigma_rel']:.3f}, FID {best['fid']:.4f}")
        distributed.print0(f"Swept {len(result['fid'])} sigma_rel at {result['kimg']} kimg, {result['num_images']} "
                           f"images each, in {result['seconds']:.1f} s; best sigma_rel {best['sigma_rel']:.3f} "
                           f"(FID {best['fid']:.4f}) -> {written}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
