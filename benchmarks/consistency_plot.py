"""FID against network calls for several few-step models of one teacher (benchmarks/consistency.py's JSON files).

    python benchmarks/consistency_plot.py --out=docs/consistency-60kimg.png \\
        benchmarks/results/consistency-60kimg-{ect,ect-q4,distill,distill-guided}.json
"""

from __future__ import annotations

import json
import os

import click


def finish_nfe_plot(fig, ax, path: str, fontsize: float | None = None) -> None:
    """The axes of an FID-against-NFE plot (log NFE, the NFEs measured as ticks), then save it."""
    import matplotlib
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 4, 15, 35])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("network calls per image (NFE)")
    ax.set_ylabel("FID (1,000 samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path)


@click.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--out", required=True, metavar="PNG", help="Where to write the plot")
def main(results: tuple[str, ...], out: str):
    """Plot each file's consistency FIDs by NFE, and the teacher's of the first file that has them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    teacher_done = False
    for path in results:
        with open(path) as f:
            data = json.load(f)
        name = os.path.basename(path).rsplit(".", 1)[0].split("-", 2)[-1]
        points = sorted((int(nfe), value["fid"]) for nfe, value in data["consistency"].items())
        ax.plot(*zip(*points), "o-", label=f"{name} ({data['tuning']['kimg']:g} kimg)")
        if not teacher_done and data.get("teacher_fid"):
            for guidance, style in ((1, "s--"), (data["guidance"], "^--")):
                curve = sorted((v["nfe"], v["fid"]) for v in data["teacher_fid"].values() if v["guidance"] == guidance)
                ax.plot(*zip(*curve), style, color="gray",
                        label="teacher, UniPC" + ("" if guidance == 1 else f", autoguided w = {guidance:g}"))
            teacher_done = True
    finish_nfe_plot(fig, ax, out, fontsize=8)
    print(f"Plotted {len(results)} runs -> {out}")


if __name__ == "__main__":
    main()
