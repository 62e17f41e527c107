"""The three experiments of the miniature. Each lists its pieces (``pieces.Workspace``), runs the unfinished ones, and
writes ``<name>.json`` (every number), ``<name>.md`` (the table) and ``<name>.png`` (the plot) from them.

- ``table2``: configs A-F (Table 2) x the size's training seeds, each evaluated with the paper's deterministic
  sampler at its NFE.
- ``fig2``: FID against NFE for the VP baseline (config A) and the EDM-trained network (config F) under the
  original sampler and the sampler improvements of Section 3 (Figure 2, the columns of Table 1), and each point's
  sampling error (its images against the same sampler's with many more steps).
- ``fig5b``: FID against S_churn of Algorithm 2 for one network (Section 4, Figure 5b).

The networks of ``fig2`` and ``fig5b`` are ``table2``'s runs of the first training seed; whichever command runs
first trains them.
"""

from __future__ import annotations

import time
from typing import Callable

from benchmarks.paper import report
from benchmarks.paper.configs import PAPER_FID, PAPER_NFE, TABLE2, check_config
from benchmarks.paper.pieces import Piece, RunSummary, Workspace, machine_description, write_json

PAPER_COLUMN = "unconditional VP"  # Table 2's column the miniature is compared with (Figure 2's VP baseline too).

# Figure 2's sampler steps on a network (the README's Table 1 options): the original VP sampler (Table 1's VP
# column, Euler), + Heun and the EDM time steps {t_i} (Eq. 5), + the EDM sigma(t) = t and s(t) = 1 (Algorithm 1).
FIG2_SAMPLERS = {
    "original": dict(title="original (Euler, VP {t_i}, sigma(t), s(t))",
                     kwargs=dict(solver="euler", discretization="vp", schedule="vp", scaling="vp")),
    "heun_edm_steps": dict(title="+ Heun & our {t_i}",
                           kwargs=dict(solver="heun", discretization="edm", schedule="vp", scaling="vp")),
    "edm": dict(title="+ our sigma(t) & s(t)",
                kwargs=dict(solver="heun", discretization="edm", schedule="linear", scaling="none")),
}
FIG2_NETWORKS = {"A": "VP baseline (config A)", "F": "EDM-trained (config F)"}
# Each point's sampling error is measured against the same sampler at this many times the curve's most steps.
FIG2_CONVERGED_FACTOR = 4
FIG5B_DEFAULT_CONFIG = "A"  # The paper's Figure 5b evaluates the baseline networks.
FIG5B_SAMPLER = "Algorithm 2 with S_min = 0, S_max = inf, S_noise = 1"  # Only S_churn varies.


def nfe_of(solver: str, num_steps: int) -> int:
    """Network evaluations of a sampler run: one per Euler step, two per Heun step but the last (Euler)."""
    return num_steps if solver == "euler" else 2 * num_steps - 1


def _finish(ws: Workspace, name: str, data: dict, markdown: Callable[[dict], str],
            plot: Callable[[dict, str], None]) -> None:
    write_json(ws.path(f"{name}.json"), data)
    with open(ws.path(f"{name}.md"), "w") as f:
        f.write(markdown(data))
    plot(data, ws.path(f"{name}.png"))


def _floor(ws: Workspace, num_images: int) -> float:
    return ws.result(ws.floor_piece(num_images))["fid"]


def _header(ws: Workspace, name: str, summary: RunSummary, machine: dict) -> dict:
    return dict(experiment=name, size=ws.size.name, machine=machine, wall_clock_minutes=round(summary.seconds / 60, 2),
                pieces=summary.total, pieces_run=summary.ran, written=time.strftime("%Y-%m-%d %H:%M:%S"))


# ----------------------------------------------------------------------------
# Table 2.

def table2_pieces(ws: Workspace) -> list[Piece]:
    size = ws.size
    pieces = [ws.floor_piece(size.table2_samples)]
    pieces += [ws.train_piece(config, seed) for config in TABLE2 for seed in size.seeds]
    pieces += [table2_fid_piece(ws, config, seed) for config in TABLE2 for seed in size.seeds]
    return pieces


def table2_fid_piece(ws: Workspace, config: str, seed: int) -> Piece:
    return ws.fid_piece(f"eval/table2/{config}-seed{seed}.json", f"FID {config} seed {seed}", config, seed,
                        dict(num_steps=ws.size.table2_steps), ws.size.table2_samples)


def table2(ws: Workspace) -> RunSummary:
    """Table 2 in miniature: train every config with every seed, then FID with the deterministic sampler."""
    machine = machine_description(ws.device)
    summary = ws.run(table2_pieces(ws), "Table 2")
    configs = {}
    for name, paper_config in TABLE2.items():
        trained = [ws.trained(name, seed) for seed in ws.size.seeds]
        fids = [ws.result(table2_fid_piece(ws, name, seed))["fid"] for seed in ws.size.seeds]
        mean, std = report.mean_and_std(fids)
        configs[name] = dict(
            title=paper_config.title, paper_fid=PAPER_FID[PAPER_COLUMN][name], fids=fids, fid_mean=mean, fid_std=std,
            kimg=trained[0]["kimg"], images=trained[0]["images"], params=trained[0]["params"],
            train_seconds=[t["train_seconds"] for t in trained],
            train_seconds_mean=report.mean_and_std([t["train_seconds"] for t in trained])[0],
            sec_per_kimg_mean=report.mean_and_std([t["sec_per_kimg"] for t in trained])[0],
            network_class=trained[0]["network_class"], loss_class=trained[0]["loss_class"],
            augment=trained[0]["augment"], train_args=trained[0]["train_args"], options=trained[0]["options"])
    names = list(configs)
    steps = [dict(config=cur, **report.step_effect(configs[prev], configs[cur])) for prev, cur in zip(names, names[1:])]
    size = ws.size
    data = dict(
        _header(ws, "table2", summary, machine),
        protocol=dict(num_samples=size.table2_samples, num_ref=size.num_ref, steps=size.table2_steps,
                      nfe=nfe_of("heun", size.table2_steps), sampler="EDM deterministic (Algorithm 1)",
                      training_seeds=list(size.seeds), kimg=size.kimg, floor=_floor(ws, size.table2_samples)),
        paper=dict(column=PAPER_COLUMN, nfe=PAPER_NFE, fid=PAPER_FID[PAPER_COLUMN]),
        configs=configs, steps=steps,
        ordering=dict(here=report.ordering({n: c["fid_mean"] for n, c in configs.items()}),
                      paper=report.ordering(PAPER_FID[PAPER_COLUMN])))
    _finish(ws, "table2", data, report.table2_markdown, report.plot_table2)
    return summary


# ----------------------------------------------------------------------------
# Figure 2.

def fig2_steps(ws: Workspace, sampler: str) -> tuple[int, ...]:
    """The step counts of one sampler's curve."""
    euler = FIG2_SAMPLERS[sampler]["kwargs"]["solver"] == "euler"
    return ws.size.fig2_euler_steps if euler else ws.size.fig2_heun_steps


def fig2_points(ws: Workspace) -> list[tuple[str, str, int]]:
    """(config, sampler, steps) of every point of the figure."""
    return [(config, sampler, steps) for config in FIG2_NETWORKS for sampler in FIG2_SAMPLERS
            for steps in fig2_steps(ws, sampler)]


def fig2_sampler_kwargs(sampler: str, steps: int) -> dict:
    return dict(FIG2_SAMPLERS[sampler]["kwargs"], num_steps=steps)


def fig2_fid_piece(ws: Workspace, config: str, sampler: str, steps: int) -> Piece:
    seed = ws.size.seeds[0]
    kwargs = fig2_sampler_kwargs(sampler, steps)
    return ws.fid_piece(f"eval/fig2/{config}-seed{seed}-{sampler}-steps{steps}.json",
                        f"FID {config} {sampler} {steps} steps", config, seed, kwargs, ws.size.fig2_samples)


def fig2_error_piece(ws: Workspace, config: str, sampler: str, steps: int) -> Piece:
    """The point's sampling error: its images against the same sampler's at FIG2_CONVERGED_FACTOR times the
    curve's most steps, same seeds."""
    seed = ws.size.seeds[0]
    kwargs = fig2_sampler_kwargs(sampler, steps)
    converged = fig2_sampler_kwargs(sampler, FIG2_CONVERGED_FACTOR * max(fig2_steps(ws, sampler)))
    return ws.error_piece(f"eval/fig2/{config}-seed{seed}-{sampler}-steps{steps}-error.json",
                          f"error {config} {sampler} {steps} steps", config, seed, kwargs, converged,
                          ws.size.fig2_samples)


def fig2(ws: Workspace) -> RunSummary:
    """Figure 2 in miniature: FID against NFE of the trained VP baseline and EDM network under each sampler step."""
    machine = machine_description(ws.device)
    points = fig2_points(ws)
    pieces = [ws.floor_piece(ws.size.fig2_samples)]
    pieces += [ws.train_piece(config, ws.size.seeds[0]) for config in FIG2_NETWORKS]
    pieces += [fig2_fid_piece(ws, *point) for point in points]
    pieces += [fig2_error_piece(ws, *point) for point in points]
    summary = ws.run(pieces, "Figure 2")
    networks = {config: dict(title=f"{title}, seed {ws.size.seeds[0]}", curves={s: [] for s in FIG2_SAMPLERS})
                for config, title in FIG2_NETWORKS.items()}
    for config, sampler, steps in points:
        result = ws.result(fig2_fid_piece(ws, config, sampler, steps))
        error = ws.result(fig2_error_piece(ws, config, sampler, steps))["rms_error"]
        networks[config]["curves"][sampler].append(dict(steps=steps, nfe=result["nfe"], fid=result["fid"],
                                                        rms_error=error))
    data = dict(
        _header(ws, "fig2", summary, machine),
        protocol=dict(num_samples=ws.size.fig2_samples, num_ref=ws.size.num_ref,
                      floor=_floor(ws, ws.size.fig2_samples), converged_factor=FIG2_CONVERGED_FACTOR),
        samplers={name: dict(title=s["title"], **s["kwargs"]) for name, s in FIG2_SAMPLERS.items()},
        networks=networks)
    _finish(ws, "fig2", data, report.fig2_markdown, report.plot_fig2)
    return summary


# ----------------------------------------------------------------------------
# Figure 5b (Section 4: stochastic sampling).

def fig5b_fid_piece(ws: Workspace, config: str, churn: float) -> Piece:
    seed = ws.size.seeds[0]
    kwargs = dict(num_steps=ws.size.fig5b_steps, S_churn=churn)
    return ws.fid_piece(f"eval/fig5b/{config}-seed{seed}-churn{churn:g}.json", f"FID {config} S_churn {churn:g}",
                        config, seed, kwargs, ws.size.fig5b_samples)


def fig5b(ws: Workspace, config: str = FIG5B_DEFAULT_CONFIG) -> RunSummary:
    """FID against S_churn (Algorithm 2; S_min, S_max and S_noise at their neutral values) for one trained
    network."""
    from training.sampling import Churn
    check_config(config)
    machine = machine_description(ws.device)
    seed = ws.size.seeds[0]
    pieces = [ws.floor_piece(ws.size.fig5b_samples), ws.train_piece(config, seed)]
    pieces += [fig5b_fid_piece(ws, config, churn) for churn in ws.size.fig5b_churn]
    summary = ws.run(pieces, "Figure 5b")
    points = [dict(S_churn=churn, gamma=Churn(S_churn=churn).gamma(1.0, ws.size.fig5b_steps),
                   fid=ws.result(fig5b_fid_piece(ws, config, churn))["fid"]) for churn in ws.size.fig5b_churn]
    data = dict(
        _header(ws, "fig5b", summary, machine),
        network=dict(config=config, seed=seed, title=f"{TABLE2[config].title} (config {config}, seed {seed})"),
        protocol=dict(num_samples=ws.size.fig5b_samples, num_ref=ws.size.num_ref, steps=ws.size.fig5b_steps,
                      nfe=nfe_of("heun", ws.size.fig5b_steps), sampler=FIG5B_SAMPLER, floor=_floor(ws, ws.size.fig5b_samples)),
        points=points)
    _finish(ws, "fig5b", data, report.fig5b_markdown, report.plot_fig5b)
    return summary


EXPERIMENTS = {"table2": table2, "fig2": fig2, "fig5b": fig5b}


def outputs(ws: Workspace, name: str) -> list[str]:
    """The files an experiment writes: its JSON, Markdown table and plot."""
    return [ws.path(f"{name}.{ext}") for ext in ("json", "md", "png")]
