"""Plot what training runs wrote: one PNG dashboard per run, and an overlay when several runs are given.

  python plot_run.py training-runs/00003-cifar10-32x32-cond-ddpmpp-edm
  python plot_run.py RUN_A RUN_B --out=compare.png

A dashboard shows, where the run logged them: the loss against kimg (smoothed in long runs) and the loss by noise
level at a few points in training (EDM's Fig. 5 view), both without the untrained tick 0; FID/KID/FD-DINOv2 against
kimg, a line per network (metrics.jsonl, from train.py --metrics); the learning rate and the EMA half-life, images
per second, memory, and the latest sample grid. The loss axes are logarithmic only when every value on them is positive
(EDM2's loss, with its learned log-variance term, goes below zero). It reads only stats.jsonl, metrics.jsonl and
samples-*.png; nothing is computed again. ``build_dashboard`` returns the matplotlib figure and its axes by panel.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click
import numpy as np

import dnnlib
from training.run_files import newest_sample_grid

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure



class NotARunError(ValueError):
    """A folder without the files a training run writes."""


def read_jsonl(path: str) -> list[dict]:
    """One dict per line of ``path`` ([] without the file). A last line without its newline that is not JSON yet
    is a running training's line being written, and is left out; any other bad line is a one-line error."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise NotARunError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict):
            raise NotARunError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


METRIC_KEYS = ("kimg", "metric", "value", "network")


def check_metrics(path: str, records: list[dict]) -> list[dict]:
    """The records of ``metrics.jsonl``, each with kimg, metric, value and network, or a one-line error."""
    for number, record in enumerate(records, start=1):
        missing = [key for key in METRIC_KEYS if key not in record]
        if missing:
            raise NotARunError(f"{path}: record {number} has no {', '.join(missing)}")
    return records


def load_run(run_dir: str) -> dict:
    """The run's per-tick stats (stats.jsonl), its metrics records (metrics.jsonl) and its newest sample grid."""
    if not os.path.isdir(run_dir):
        raise NotARunError(f"{run_dir}: no such folder")
    stats = read_jsonl(os.path.join(run_dir, "stats.jsonl"))
    if not stats:
        raise NotARunError(f"{run_dir}: not a training run (no stats.jsonl with any tick in it)")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    return dict(name=os.path.basename(os.path.normpath(run_dir)), stats=stats,
                metrics=check_metrics(metrics_path, read_jsonl(metrics_path)), grid=newest_sample_grid(run_dir))


def series(stats: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(kimg, mean of ``name``) over the ticks that have a finite value of it."""
    points = [(s["Progress/kimg"]["mean"], s[name]["mean"]) for s in stats
              if isinstance(s.get(name), dict) and "Progress/kimg" in s and s[name]["mean"] is not None
              and math.isfinite(s[name]["mean"])]
    return (np.array([p[0] for p in points]), np.array([p[1] for p in points])) if points else (np.array([]),) * 2


def smoothing_span(num_ticks: int, most: int = 10) -> int:
    """Ticks in the loss's smoothing window: a tenth of the run, at most ``most``. A short run is not smoothed, since
    a window as long as the run would carry the untrained tick 0's loss to the end of the curve."""
    return max(1, min(most, num_ticks // 10))


def smooth(values: np.ndarray, span: int = 10) -> np.ndarray:
    """Exponential moving average with the weight of a ``span``-tick window (alpha = 2 / (span + 1)); span 1 is the
    values themselves."""
    alpha, out, acc = 2 / (span + 1), np.empty_like(values, dtype=np.float64), None
    for i, v in enumerate(values):
        acc = v if acc is None else acc + alpha * (v - acc)
        out[i] = acc
    return out


def sigma_buckets(stats: list[dict]) -> list[tuple[str, float, float]]:
    """(stat name, lower edge, upper edge) of each ``Loss/sigma_LO-HI`` the run logged, by sigma."""
    found = {k for s in stats for k in s if k.startswith("Loss/sigma_")}
    buckets = []
    for name in found:
        lo, hi = name[len("Loss/sigma_"):].split("-")
        buckets.append((name, float(lo), float(hi)))
    return sorted(buckets, key=lambda b: b[1])


def loss_by_sigma(stat: dict, buckets) -> tuple[np.ndarray, np.ndarray]:
    """(geometric bucket centres, mean loss) of one tick, buckets without images left out."""
    points = [(math.sqrt(lo * hi), stat[name]["mean"]) for name, lo, hi in buckets
              if name in stat and stat[name]["num"] and math.isfinite(stat[name]["mean"])]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


# ----------------------------------------------------------------------------
# Panels: each draws on an axis and says whether it had data.

def value_scale(values: list[np.ndarray]) -> str:
    """The y scale that shows every value: "log" when all are positive, else "linear" (EDM2's loss, with its
    learned log-variance term, goes below zero and would fall off a log axis)."""
    flat = np.concatenate([np.ravel(v) for v in values]) if values else np.array([])
    return "log" if flat.size and bool((flat > 0).all()) else "linear"


def plotted_y(ax) -> list[np.ndarray]:
    """The y data of every line on ``ax``."""
    return [np.asarray(line.get_ydata(), dtype=np.float64) for line in ax.get_lines()]


def panel_loss(ax, runs: list[dict]) -> bool:
    """The loss against kimg, raw (faint) and smoothed over a tenth of the run (at most 10 ticks), tick 0 left out
    when there are later ticks, on a log axis only when every value is positive."""
    drawn = smoothed = False
    for run in runs:
        kimg, loss = series(trained_ticks(run["stats"]), "Loss/loss")
        if len(kimg):
            line, = ax.plot(kimg, loss, alpha=0.25)
            span = smoothing_span(len(loss))
            ax.plot(kimg, smooth(loss, span), color=line.get_color(), label=run["name"])
            smoothed = smoothed or span > 1
            drawn = True
    ax.set(title="Training loss" + (" (smoothed)" if smoothed else ""), xlabel="kimg", ylabel="loss",
           yscale=value_scale(plotted_y(ax)))
    return drawn


def trained_ticks(ticks: list[dict]) -> list[dict]:
    """``ticks`` without tick 0 (one step from the initial network, whose loss dwarfs the rest) when later ticks
    exist. Tick 0 is ``Progress/tick`` 0 (a resumed run continues the count), else the first tick logged."""
    if any("Progress/tick" in s for s in ticks):
        later = [s for s in ticks if s.get("Progress/tick", {}).get("mean") != 0]
    else:
        later = ticks[1:]
    return later or ticks


def panel_loss_by_sigma(ax, runs: list[dict], points: int = 4) -> bool:
    """The loss by sigma at ``points`` ticks spread over the run (one run), or at the last tick (several); tick 0
    left out when there are later ticks, and a log y axis only when every value is positive."""
    drawn = False
    for run in runs:
        buckets = sigma_buckets(run["stats"])
        ticks = trained_ticks([s for s in run["stats"] if any(name in s and s[name]["num"] for name, _, _ in buckets)])
        if not ticks:
            continue
        chosen = [ticks[-1]] if len(runs) > 1 else [ticks[i] for i in sorted(set(
            np.linspace(0, len(ticks) - 1, min(points, len(ticks))).round().astype(int)))]
        for tick in chosen:
            x, y = loss_by_sigma(tick, buckets)
            label = run["name"] if len(runs) > 1 else f"{tick['Progress/kimg']['mean']:g} kimg"
            ax.plot(x, y, "o-", markersize=3, label=label)
            drawn = True
    ax.set(title="Loss by noise level", xlabel="sigma", ylabel="mean loss", xscale="log",
           yscale=value_scale(plotted_y(ax)))
    return drawn


METRIC_NAMES = {"fid": "FID", "kid": "KID", "fd_dinov2": "FD-DINOv2"}


def metric_points(records: list[dict], metric: str, network: str) -> tuple[np.ndarray, np.ndarray]:
    """(kimg, value) of one metric of one network, by kimg, finite values only."""
    points = sorted((float(r["kimg"]), float(r["value"])) for r in records
                    if r["metric"] == metric and r["network"] == network and r["value"] is not None
                    and math.isfinite(r["value"]))
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def panel_metric(ax, runs: list[dict], metric: str) -> bool:
    """One metric (metrics.jsonl) against kimg: a line per network (and run)."""
    drawn = False
    for run in runs:
        networks = dict.fromkeys(r["network"] for r in run["metrics"] if r["metric"] == metric)
        for network in networks:
            kimg, value = metric_points(run["metrics"], metric, network)
            if len(kimg):
                label = network if len(runs) == 1 else f"{run['name']} {network}"
                ax.plot(kimg, value, "o-", markersize=3, label=label)
                drawn = True
    name = METRIC_NAMES.get(metric, metric.upper())
    num = {r["num_images"] for run in runs for r in run["metrics"] if r["metric"] == metric and "num_images" in r}
    images = f" ({', '.join(str(n) for n in sorted(num))} images)" if num else ""
    ax.set(title=f"{name}{images}", xlabel="kimg", ylabel=name)
    return drawn


def panel_schedule(ax, runs: list[dict]) -> bool:
    drawn = False
    twin = None
    for run in runs:
        kimg, lr = series(run["stats"], "Progress/lr")
        if len(kimg):
            ax.plot(kimg, lr, label=f"{run['name']} lr" if len(runs) > 1 else "learning rate")
            drawn = True
        kimg, ema = series(run["stats"], "Progress/ema_halflife_kimg")
        if len(kimg):
            twin = twin or ax.twinx()
            twin.plot(kimg, ema, "--", color="tab:gray", label="EMA half-life")
            twin.set_ylabel("EMA half-life (kimg)")
            drawn = True
    ax.set(title="Learning rate and EMA length", xlabel="kimg", ylabel="learning rate")
    return drawn


def panel_speed(ax, runs: list[dict]) -> bool:
    drawn = False
    for run in runs:
        kimg, sec_per_kimg = series(run["stats"], "Timing/sec_per_kimg")
        keep = sec_per_kimg > 0
        if keep.any():
            ax.plot(kimg[keep], 1000 / sec_per_kimg[keep], label=run["name"])
            drawn = True
    ax.set(title="Training speed", xlabel="kimg", ylabel="images / s")
    return drawn


def panel_memory(ax, runs: list[dict]) -> bool:
    drawn = False
    for run in runs:
        for stat, what in (("Resources/cpu_mem_gb", "host"), ("Resources/peak_gpu_mem_gb", "GPU peak")):
            kimg, gib = series(run["stats"], stat)
            if len(kimg) and gib.max() > 0:
                ax.plot(kimg, gib, label=what if len(runs) == 1 else f"{run['name']} {what}")
                drawn = True
    ax.set(title="Memory", xlabel="kimg", ylabel="GiB")
    return drawn


def panel_grid(ax, path: str) -> bool:
    import PIL.Image

    image = np.asarray(PIL.Image.open(path))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set(title=f"Samples: {os.path.basename(path)}")
    ax.axis("off")
    return True


def panels_for(runs: list[dict]) -> list[tuple[str, callable]]:
    """(title, draw(ax) -> had data) of every panel the runs have data for, in dashboard order."""
    metrics = list(dict.fromkeys(r["metric"] for run in runs for r in run["metrics"]))
    panels = [("loss", lambda ax: panel_loss(ax, runs)), ("loss by sigma", lambda ax: panel_loss_by_sigma(ax, runs))]
    panels += [(metric, lambda ax, m=metric: panel_metric(ax, runs, m)) for metric in metrics]
    panels += [("lr and ema", lambda ax: panel_schedule(ax, runs)), ("speed", lambda ax: panel_speed(ax, runs)),
               ("memory", lambda ax: panel_memory(ax, runs))]
    if len(runs) == 1 and runs[0]["grid"]:
        panels.append(("samples", lambda ax: panel_grid(ax, runs[0]["grid"])))
    return panels


@dataclass
class Dashboard:
    """A drawn dashboard: the matplotlib Figure and its axes by panel name, in dashboard order."""
    figure: matplotlib.figure.Figure
    axes: dict[str, matplotlib.axes.Axes]


def build_dashboard(runs: list[dict], title: str) -> Dashboard:
    """The figure with a panel per kind of data the runs have (a panel without data leaves no gap)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = panels_for(runs)
    cols = 3
    rows = math.ceil(len(candidates) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), dpi=100, squeeze=False)
    drawn, slots = {}, list(axes.flat)
    for name, draw in candidates:
        ax = slots[len(drawn)]
        if draw(ax):
            drawn[name] = ax
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        else:
            ax.clear()  # A panel without data leaves no gap: the next one takes its place.
    for ax in slots[len(drawn):]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return Dashboard(fig, drawn)


def save_dashboard(board: Dashboard, out: str) -> None:
    """Write the dashboard as a PNG at ``out`` (atomically) and close its figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    board.figure.savefig(buffer, format="png")
    plt.close(board.figure)
    dnnlib.util.atomic_write_bytes(out, buffer.getvalue())


def dashboard(runs: list[dict], out: str, title: str) -> list[str]:
    """Write one PNG with a panel per kind of data the runs have; returns the names of the panels drawn."""
    board = build_dashboard(runs, title)
    save_dashboard(board, out)
    return list(board.axes)


def plot_runs(run_dirs: list[str], out: str | None = None) -> dict[str, list[str]]:
    """A dashboard per run (``RUN_DIR/dashboard.png``, or ``out`` for a single run) and, for several runs, an
    overlay (``out``, default ``runs-overlay.png``). Returns {PNG path: panels drawn}."""
    runs = [load_run(d) for d in run_dirs]
    written = {}
    for run_dir, run in zip(run_dirs, runs):
        path = out if out and len(runs) == 1 else os.path.join(run_dir, "dashboard.png")
        written[path] = dashboard([run], path, run["name"])
    if len(runs) > 1:
        path = out or "runs-overlay.png"
        written[path] = dashboard(runs, path, " vs ".join(run["name"] for run in runs))
    return written


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR ...]")
@click.option("--out", metavar="PNG", help="The dashboard of a single run, or the overlay of several  "
                                           "[default: RUN_DIR/dashboard.png; runs-overlay.png]")
def main(run_dirs, out):
    """Plot training runs: loss, loss by noise level, FID/KID, learning rate, speed, memory, samples."""
    try:
        written = plot_runs(list(run_dirs), out)
    except (NotARunError, OSError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    for path, panels in written.items():
        print(f"{path}: {', '.join(panels)}")


if __name__ == "__main__":
    main()
