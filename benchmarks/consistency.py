"""Few-step generation by consistency tuning (train.py --consistency, ECT) against its teacher, at the quickstart's
protocol: FID of 1,000 samples against the statistics of 1,000 held-out images.

    # The teacher: the cpu preset's network (quickstart.py), then tune it and measure both
    python quickstart.py --outdir=qs --preset=cpu --kimg=60
    python benchmarks/consistency.py --run=qs --kimg=20 --outdir=ct-runs \\
        --out=benchmarks/results/consistency-cpu.json --plot=docs/consistency-cpu.png

The tuning starts from the run's last snapshot with the preset's architecture, for --kimg thousand images; its FID
is measured with the consistency sampler at NFE 1, 2 and 4, the teacher's with the preset's sampler (UniPC,
log-uniform steps) at NFE 15 and 35, unguided and autoguided by the run's 'earlier' guide at the preset's weight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from quickstart import PRESETS, adapt_preset, cpu_lacks_bf16, render  # noqa: E402
from benchmarks.consistency_plot import finish_nfe_plot  # noqa: E402
from training.run_files import labelled_nimg, snapshots  # noqa: E402

PRESET = adapt_preset(PRESETS["cpu"], kimg=None, fp32=cpu_lacks_bf16(None))  # bf16 only where the CPU has it.
TUNING = {"lr": 0.005, "lr-decay": 0, "lr-rampup": 0, "ema": 0.002, "ema-std": "none", "dropout": 0}


def run(command: list[str]) -> str:
    print("$", " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{command[1]} failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout


def earlier_guide(run_dir: str, kimg: float) -> str:
    """The 'earlier' guide of the quickstart: the run's snapshot nearest ``kimg`` (a share of its training)."""
    return min(snapshots(run_dir), key=lambda p: abs(labelled_nimg(p) / 1000 - kimg))


def fid(network: str, ref: str, num: int, sampler: list[str], gnet: str | None = None, guidance: float = 1) -> dict:
    """FID of ``num`` images for seeds 0..num-1, balanced classes, made in memory (fid.py calc --network)."""
    start = time.time()
    guide = [f"--gnet={gnet}", f"--guidance={guidance:g}"] if gnet and guidance != 1 else []
    out = run([sys.executable, "fid.py", "calc", f"--network={network}", f"--ref={ref}", f"--seeds=0-{num - 1}",
               "--class=balanced", "--batch=100", *sampler, *guide])
    value = float(out.strip().splitlines()[-1])
    print(f"  FID {value:.2f} ({time.time() - start:.0f} s)", flush=True)
    return dict(fid=value, seconds=time.time() - start)


@click.command()
@click.option("--run", "qs", help="A quickstart.py --preset=cpu output folder", metavar="DIR", required=True)
@click.option("--kimg", help="Tuning length in thousands of images", type=float, default=20, show_default=True)
@click.option("--ct-stage", "ct_stage", help="train.py --ct-stage  [default: train.py's]", type=float)
@click.option("--outdir", help="Where the tuning run goes", metavar="DIR", required=True)
@click.option("--out", help="JSON to write", metavar="JSON", required=True)
@click.option("--plot", help="PNG to write", metavar="PNG")
@click.option("--skip-teacher", is_flag=True, help="Measure the tuned network only")
@click.option("--train-args", "train_args", default="", help="More train.py options, e.g. '--ct-q=4 --ct-huber=0.06' "
              "or '--distill=TEACHER' ('TEACHER' and 'GUIDE' are replaced by the run's snapshot and earlier guide)")
@click.option("--sigmas", "sigma_sets", multiple=True, help="Also measure at these levels, e.g. 80,0.8,0.002")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="train.py processes (torchrun, gloo; one thread each)")
def main(qs: str, kimg: float, ct_stage: float | None, outdir: str, out: str, plot: str | None, skip_teacher: bool,
         train_args: str, sigma_sets: tuple[str, ...], processes: int):
    """Tune the quickstart's network into a consistency model (or distil it) and compare FIDs."""
    ref, data = os.path.join(qs, "reference.npz"), os.path.join(qs, "train.zip")
    teacher = snapshots(os.path.join(qs, "training"))[-1]
    teacher_kimg = labelled_nimg(teacher) / 1000
    guide = earlier_guide(os.path.join(qs, "training"), teacher_kimg * PRESET.guide_share)
    num = PRESET.num_eval
    results = dict(teacher=teacher, teacher_kimg=teacher_kimg, guide=guide, guidance=PRESET.guidance[0],
                   protocol=f"{num} samples (seeds 0-{num - 1}, balanced classes) vs {PRESET.num_ref} held-out images",
                   tuning=dict(kimg=kimg, options=dict(TUNING, **({"ct-stage": ct_stage} if ct_stage else {})),
                               train_args=train_args, processes=processes))

    start = time.time()
    options = {**PRESET.train_options, **TUNING, "duration": kimg / 1000, "tick": kimg / 4, "snap": 1000,
               "dump": 1000}
    extra = [f"--ct-stage={ct_stage:g}"] if ct_stage else []
    extra += [arg.replace("TEACHER", teacher).replace("GUIDE", guide) for arg in train_args.split()]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "--"] \
        if processes > 1 else []
    if processes > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    run([sys.executable, *launcher, "train.py", f"--outdir={outdir}", "--nosubdir", f"--data={data}",
         *render(options), "--consistency", f"--transfer={teacher}", *extra])
    tuned = snapshots(outdir)[-1]
    results["tuning"].update(snapshot=tuned, minutes=(time.time() - start) / 60)

    results["consistency"] = {nfe: fid(tuned, ref, num, ["--sampler=consistency", f"--nfe={nfe}"])
                              for nfe in (1, 2, 4)}
    results["consistency_at_levels"] = {levels: fid(tuned, ref, num, ["--sampler=consistency", f"--sigmas={levels}"])
                                        for levels in sigma_sets}
    if not skip_teacher:
        results["teacher_fid"] = {}
        for w in (1.0, PRESET.guidance[0]):
            for nfe in (15, 35):
                sampler = ["--sampler=unipc_bh2", f"--nfe={nfe}", "--steps-schedule=loguniform"]
                results["teacher_fid"][f"w={w:g} nfe={nfe}"] = dict(fid(teacher, ref, num, sampler, guide, w),
                                                                   nfe=nfe, guidance=w)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    if plot:
        plot_results(results, plot)
    print(json.dumps({k: v for k, v in results.items() if k in ("consistency", "teacher_fid")}, indent=1))


def plot_results(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    nfes = sorted(results["consistency"], key=int)
    ax.plot([int(n) for n in nfes], [results["consistency"][n]["fid"] for n in nfes], "o-",
            label=f"consistency-tuned ({results['tuning']['kimg']:g} kimg)")
    for label, style in (("w=1", "s--"), (f"w={results['guidance']:g}", "^--")):
        points = sorted((v["nfe"], v["fid"]) for k, v in results.get("teacher_fid", {}).items() if k.startswith(label))
        if points:
            ax.plot(*zip(*points), style, label=f"teacher, UniPC, {'unguided' if label == 'w=1' else 'autoguided ' + label}")
    finish_nfe_plot(fig, ax, path)


if __name__ == "__main__":
    main()
