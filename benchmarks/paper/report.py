"""Markdown tables and plots of the miniature, made from the experiments' JSON results only (nothing is computed
twice): ``table2_markdown`` / ``plot_table2``, ``fig2_markdown`` / ``plot_fig2``, ``fig5b_markdown`` / ``plot_fig5b``.
FIDs are shown with two decimals."""

from __future__ import annotations

import math
import statistics
import textwrap
from typing import Any, Sequence


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def step_effect(previous: dict, current: dict) -> dict[str, Any]:
    """How one Table 2 step changed the mean FID here, read against the seeds' spread: 'lower' or 'higher' when
    the means differ by more than the two standard deviations together, else 'within spread'."""
    delta = current["fid_mean"] - previous["fid_mean"]
    spread = (previous["fid_std"] or 0) + (current["fid_std"] or 0)
    verdict = "within spread" if abs(delta) <= spread else ("lower" if delta < 0 else "higher")
    paper = None
    if previous.get("paper_fid") is not None and current.get("paper_fid") is not None:
        paper = current["paper_fid"] - previous["paper_fid"]
    return dict(delta=delta, spread=spread, verdict=verdict, paper_delta=paper)


def ordering(fids: dict[str, float]) -> str:
    """'E < F < D ...': configs from the lowest FID to the highest."""
    return " < ".join(sorted(fids, key=fids.get))


def machine_line(machine: dict) -> str:
    where = machine.get("gpu") or (f"{machine['cpu']}, {machine['cpu_count']} cores"
                                   + ("" if machine.get("avx512") else " without AVX-512"))
    load = machine.get("load_average")
    load_text = f", load average {load[0]:.1f} at the start" if load else ""
    return f"{where}; torch {machine['torch']}, {machine['torch_threads']} thread(s){load_text}"


def markdown_table(columns: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _figure(ncols: int = 1, width: float = 6.4, nrows: int = 1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=(width * ncols, 4.2 * nrows), dpi=110, squeeze=False)


def _save(fig, path: str) -> None:
    from training.images import save_figure
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------
# Table 2.

TABLE2_COLUMNS = ("config", "Table 2 step", "paper FID", "FID here (mean ± std)", "per seed", "step here (paper)",
                  "kimg", "train min per run", "s/kimg", "parameters")


def table2_markdown(data: dict) -> str:
    """The Table 2 results as Markdown: one row per config with the paper's FID, ours (mean, std and each seed),
    the step's effect against the previous config, images seen and wall-clock."""
    protocol, configs = data["protocol"], data["configs"]
    steps = {step["config"]: step for step in data["steps"]}
    rows = []
    for name, c in configs.items():
        step = steps.get(name)
        step_text = "" if step is None else \
            f"{signed(step['delta'])}: {step['verdict']} ({signed(step['paper_delta'])})"
        std = "" if c["fid_std"] is None else f" ± {fmt(c['fid_std'])}"
        rows.append([name, c["title"], fmt(c["paper_fid"]), f"{fmt(c['fid_mean'])}{std}",
                     ", ".join(fmt(v) for v in c["fids"]), step_text, f"{c['kimg']:g}",
                     fmt(c["train_seconds_mean"] / 60, 1), fmt(c["sec_per_kimg_mean"], 1), f"{c['params']:,}"])
    head = (f"**Table 2 in miniature** (size `{data['size']}`; {machine_line(data['machine'])}). FID of "
            f"{protocol['num_samples']} samples (EDM deterministic sampler, {protocol['steps']} Heun steps, NFE "
            f"{protocol['nfe']}) against {protocol['num_ref']} held-out reference images; real-data floor "
            f"{fmt(protocol['floor'])}. Every run trains on {protocol['kimg']:g} kimg; training seeds "
            f"{', '.join(map(str, protocol['training_seeds']))}. Paper: {data['paper']['column']} CIFAR-10 at NFE "
            f"{data['paper']['nfe']}. A step is 'lower' or 'higher' when the means differ by more than the two "
            f"configs' standard deviations together.")
    tail = f"Ordering by mean FID here: {data['ordering']['here']}; in the paper: {data['ordering']['paper']}."
    return "\n".join([head, "", *markdown_table(TABLE2_COLUMNS, rows), "", tail]) + "\n"


def plot_table2(data: dict, path: str) -> None:
    """Each seed's FID and the mean ± std per config, beside the paper's FID (right axis)."""
    fig, axes = _figure(width=7.2)
    ax = axes[0, 0]
    names = list(data["configs"])
    for i, name in enumerate(names):
        c = data["configs"][name]
        ax.plot([i] * len(c["fids"]), c["fids"], "o", color="tab:blue", alpha=0.4, markersize=4)
    means = [data["configs"][n]["fid_mean"] for n in names]
    stds = [data["configs"][n]["fid_std"] or 0 for n in names]
    ax.errorbar(range(len(names)), means, yerr=stds, fmt="s-", color="tab:blue", capsize=3,
                label=f"here ({data['protocol']['num_samples']} samples)")
    ax.axhline(data["protocol"]["floor"], color="gray", linestyle=":", label="real-data floor here")
    labels = [f"{n}\n" + textwrap.fill(data["configs"][n]["title"].replace("+ ", ""), 12) for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize="x-small")
    ax.set_ylabel("FID here")
    paper = [data["configs"][n]["paper_fid"] for n in names]
    twin = ax.twinx()
    twin.plot(range(len(names)), paper, "d--", color="tab:orange", label="paper (CIFAR-10, 50k samples)")
    twin.set_ylabel("FID in the paper", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="x-small")
    ax.set_title(f"Table 2 in miniature ({data['size']})", fontsize="medium")
    _save(fig, path)


# ----------------------------------------------------------------------------
# Figure 2.

FIG2_COLUMNS = ("network", "sampler", "NFE", "FID", "RMS error (8-bit levels)")


def fig2_markdown(data: dict) -> str:
    """FID at each NFE for every (network, sampler): the curves of Figure 2 as rows."""
    rows = []
    for network in data["networks"].values():
        for sampler, points in network["curves"].items():
            for p in points:
                rows.append([network["title"], data["samplers"][sampler]["title"], str(p["nfe"]), fmt(p["fid"]),
                             fmt(p["rms_error"])])
    protocol = data["protocol"]
    head = (f"**Figure 2 in miniature** (size `{data['size']}`; {machine_line(data['machine'])}). FID of "
            f"{protocol['num_samples']} samples (seeds 0-{protocol['num_samples'] - 1}, the same at every NFE) "
            f"against {protocol['num_ref']} held-out reference images; real-data floor {fmt(protocol['floor'])}. RMS "
            f"error: the images against the same sampler's with {protocol['converged_factor']}x the curve's most "
            f"steps (same seeds, before rounding to pixels).")
    best = []
    for network in data["networks"].values():
        parts = [f"{data['samplers'][s]['title']} {fmt(min(p['fid'] for p in pts))}"
                 for s, pts in network["curves"].items()]
        best.append(f"{network['title']}: lowest FID " + "; ".join(parts))
    return "\n".join([head, "", *markdown_table(FIG2_COLUMNS, rows), "", *(f"- {line}" for line in best)]) + "\n"


def plot_fig2(data: dict, path: str) -> None:
    """FID against NFE (log axis), one panel per network, one curve per sampler; below, each point's sampling
    error (log-log: the slope is the solver's order in NFE)."""
    from matplotlib.ticker import ScalarFormatter
    networks = list(data["networks"].values())
    fig, axes = _figure(len(networks), width=5.2, nrows=2)
    for ax, network in zip(axes[1], networks):
        for sampler, points in network["curves"].items():
            ax.plot([p["nfe"] for p in points], [p["rms_error"] for p in points], "o-", markersize=4,
                    label=data["samplers"][sampler]["title"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set(xlabel="NFE", ylabel="RMS error to converged (8-bit levels)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    for ax, network in zip(axes[0], networks):
        for sampler, points in network["curves"].items():
            ax.plot([p["nfe"] for p in points], [p["fid"] for p in points], "o-", markersize=4,
                    label=data["samplers"][sampler]["title"])
        ax.axhline(data["protocol"]["floor"], color="gray", linestyle=":", label="real-data floor")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("NFE")
        ax.set_ylabel(f"FID ({data['protocol']['num_samples']} samples)")
        ax.set_title(network["title"], fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    _save(fig, path)


# ----------------------------------------------------------------------------
# Figure 5b.

FIG5B_COLUMNS = ("S_churn", "gamma_i", "FID")


def churn_cap(steps: int) -> float:
    """The S_churn past which Algorithm 2's gamma_i = min(S_churn / N, sqrt(2) - 1) no longer grows."""
    return steps * (2 ** 0.5 - 1)


def fig5b_markdown(data: dict) -> str:
    """FID at each S_churn of Algorithm 2 for one network."""
    protocol = data["protocol"]
    head = (f"**Stochastic sampling in miniature** (size `{data['size']}`; {machine_line(data['machine'])}). "
            f"{data['network']['title']}, {protocol['sampler']}, {protocol['steps']} steps (NFE {protocol['nfe']}); FID of "
            f"{protocol['num_samples']} samples against {protocol['num_ref']} held-out reference images; real-data "
            f"floor {fmt(protocol['floor'])}.")
    rows = [[f"{p['S_churn']:g}", f"{p['gamma']:.3f}", fmt(p["fid"])] for p in data["points"]]
    best = min(data["points"], key=lambda p: p["fid"])
    tail = (f"Lowest FID {fmt(best['fid'])} at S_churn {best['S_churn']:g} (0 is the deterministic sampler). "
            f"gamma_i = min(S_churn / {protocol['steps']}, sqrt(2) - 1) at every step (Algorithm 2): larger S_churn "
            f"than {churn_cap(protocol['steps']):.2f} is the same sampler.")
    return "\n".join([head, "", *markdown_table(FIG5B_COLUMNS, rows), "", tail]) + "\n"


def plot_fig5b(data: dict, path: str) -> None:
    fig, axes = _figure(width=5.2)
    ax = axes[0, 0]
    points = data["points"]
    ax.plot([p["S_churn"] for p in points], [p["fid"] for p in points], "o-", markersize=4, label="Algorithm 2")
    ax.axhline(data["protocol"]["floor"], color="gray", linestyle=":", label="real-data floor")
    ax.axvline(churn_cap(data["protocol"]["steps"]), color="tab:red", linestyle="--", linewidth=0.8,
               label="gamma_i at its cap, sqrt(2) - 1")
    ax.set_xlabel("S_churn")
    ax.set_ylabel(f"FID ({data['protocol']['num_samples']} samples)")
    ax.set_title(f"{data['network']['title']}, NFE {data['protocol']['nfe']}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    _save(fig, path)
