"""Samplers against their budget of network calls (NFE): error on an exact problem, and FID on a real network.

    # Error against NFE on the Gaussian-mixture problem (benchmarks/mixture.py), ours and k-diffusion's
    python benchmarks/samplers.py mixture --out=benchmarks/results/samplers-mixture.json \\
        --plot=benchmarks/results/samplers-mixture.png

    # FID against NFE on a trained network, for Heun and the best few
    python benchmarks/samplers.py fid --network=PKL --ref=REF.npz --num=1000 --nfe=10,15,20,35,50 \\
        --samplers=heun,unipc_bh2:optimized,dpmpp_3m:loguniform --out=fid.json --plot=fid.png

A sampler is given as NAME or NAME:SCHEDULE (``training.sampling.SAMPLERS``, ``NAMED_TIME_STEPS``). k-diffusion
(``pip install --no-deps k-diffusion torchdiffeq torchsde trampoline``) is needed only for the comparison in
``mixture``; without it that part is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script from anywhere.

from benchmarks.mixture import GaussianMixtureDenoiser, exact_end_points, relative_error  # noqa: E402
from dnnlib.util import atomic_write_bytes  # noqa: E402
from training.sampling import NAMED_TIME_STEPS, SAMPLERS, NamedSampler  # noqa: E402

NFES = (5, 10, 15, 20, 35, 50, 100)
GOAL_NFES = (10, 20, 35, 100)
SEARCHED = ("unipc_bh2", "dpmpp_2m", "dpmpp_3m", "dpmpp_4m", "ipndm", "lms")  # 'optimized' only for these (time)

# ----------------------------------------------------------------------------
# Ours.


def our_errors(net: GaussianMixtureDenoiser, latents: torch.Tensor, exact: torch.Tensor, nfes,
               names=None, schedules=NAMED_TIME_STEPS + ("optimized+gaussian",)) -> dict[str, dict[int, float]]:
    """{'NAME:SCHEDULE': {nfe: relative error}} for every deterministic sampler and schedule (the stochastic ones
    have no single end point to compare); the calls are counted and checked against each budget."""
    results = {}
    for name in names or [n for n, s in SAMPLERS.items() if not s.solver.stochastic]:
        for schedule in schedules:
            if schedule.startswith("optimized") and name not in SEARCHED:
                continue
            row = {}
            for nfe in nfes:
                if nfe < SAMPLERS[name].solver.min_nfe:
                    continue
                if schedule.startswith("optimized"):  # The one-time search (and fit) is not part of the budget.
                    SAMPLERS[name].levels(net, latents, nfe, schedule, 0.002, 80, 7)
                net.calls = 0
                x = SAMPLERS[name](net, latents, nfe=nfe, time_steps=schedule)
                assert net.calls <= nfe, (name, schedule, nfe, net.calls)
                row[nfe] = relative_error(x, exact, net.data_scale)
            results[f"{name}:{schedule}"] = row
            print(f"  ours {name}:{schedule}: " + " ".join(f"{e:.2e}" for e in row.values()), flush=True)
    return results

# ----------------------------------------------------------------------------
# k-diffusion's, on the same problem.


def load_k_diffusion():
    """k_diffusion.sampling without the package's __init__ (which imports its training stack), or None."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    package = importlib.util.module_from_spec(importlib.util.spec_from_loader("k_diffusion", loader=None,
                                                                              is_package=True))
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")


def k_diffusion_errors(K, net: GaussianMixtureDenoiser, latents: torch.Tensor, exact: torch.Tensor, nfes,
                       sigma_min: float = 0.002, sigma_max: float = 80) -> dict[str, dict[int, float]]:
    """{'NAME:SCHEDULE': {nfe: relative error}} for k-diffusion's deterministic samplers (the SDE ones at eta 0)
    on its schedules, each with the most steps whose calls fit the budget (counted)."""
    schedules = {
        "karras": lambda n: K.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0),
        "exponential": lambda n: K.get_sigmas_exponential(n, sigma_min, sigma_max),
        "polyexponential": lambda n: K.get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=2.0),
    }
    one_call = dict(euler=K.sample_euler, lms=K.sample_lms, dpmpp_2m=K.sample_dpmpp_2m,
                    dpmpp_2m_sde=lambda *a, **k: K.sample_dpmpp_2m_sde(*a, eta=0.0, **k),
                    dpmpp_3m_sde=lambda *a, **k: K.sample_dpmpp_3m_sde(*a, eta=0.0, **k))
    two_call = dict(heun=K.sample_heun, dpm_2=K.sample_dpm_2,
                    dpmpp_2s=lambda *a, **k: K.sample_dpmpp_2s_ancestral(*a, eta=0.0, **k))

    def model(x, sigma, **kwargs):
        return net(x, sigma)

    results = {}
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Their schedules are built in the default dtype.
    try:
        for schedule, make in schedules.items():
            for name, sampler in {**one_call, **two_call}.items():
                row = {}
                for nfe in nfes:
                    steps = nfe if name in one_call else (nfe + 1) // 2
                    if steps < 2:
                        continue
                    net.calls = 0
                    x = sampler(model, latents * sigma_max, make(steps).to(torch.float64), disable=True)
                    assert net.calls <= nfe, (name, nfe, net.calls)
                    row[nfe] = relative_error(x, exact, net.data_scale)
                results[f"{name}:{schedule}"] = row
                print(f"  k-diffusion {name}:{schedule}: " + " ".join(f"{e:.2e}" for e in row.values()), flush=True)
        row = {}
        for nfe in nfes:
            net.calls = 0
            x = K.sample_dpm_fast(model, latents * sigma_max, sigma_min, sigma_max, nfe, disable=True)
            assert net.calls <= nfe, ("dpm_fast", nfe, net.calls)
            row[nfe] = relative_error(x, exact, net.data_scale)
        results["dpm_fast:logsnr"] = row
    finally:
        torch.set_default_dtype(previous_dtype)
    return results

# ----------------------------------------------------------------------------
# Tables and plots.


def best_per_nfe(results: dict[str, dict[int, float]], nfes) -> dict[int, tuple[str, float]]:
    """For each budget, the (sampler:schedule, error) with the smallest error."""
    best = {}
    for nfe in nfes:
        candidates = [(errors[nfe], key) for key, errors in results.items()
                      if nfe in errors and math.isfinite(errors[nfe])]
        if candidates:
            error, key = min(candidates)
            best[nfe] = (key, error)
    return best


def goal_table(ours: dict, theirs: dict, nfes=GOAL_NFES) -> str:
    """Markdown: the best of ours, the best of k-diffusion's, the paper's Heun, the ratio, and whether ours is at
    most half of theirs."""
    best_ours, best_theirs = best_per_nfe(ours, nfes), best_per_nfe(theirs, nfes)
    lines = ["| NFE | ours (best) | k-diffusion (best) | paper's Heun (EDM steps) | ours / k-diffusion "
             "| goal (<= 0.5) |",
             "| ---: | --- | --- | ---: | ---: | :---: |"]
    for nfe in nfes:
        (ours_key, ours_error), (their_key, their_error) = best_ours[nfe], best_theirs.get(nfe, ("-", math.nan))
        heun = ours.get("heun:edm", {}).get(nfe, math.nan)
        ratio = ours_error / their_error
        lines.append(f"| {nfe} | {ours_error:.2e} ({ours_key}) | {their_error:.2e} ({their_key}) | {heun:.3g} | "
                     f"{ratio:.2f} | {'yes' if ratio <= 0.5 else 'no'} |")
    return "\n".join(lines)


def full_table(results: dict[str, dict[int, float]], nfes) -> str:
    lines = ["| sampler:schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "| --- | " + " | ".join("---:" for _ in nfes) + " |"]
    for key, errors in results.items():
        lines.append(f"| {key} | " + " | ".join(f"{errors[n]:.2e}" if n in errors else "" for n in nfes) + " |")
    return "\n".join(lines)


def plot_errors(ours: dict, theirs: dict, path: str) -> None:
    """Log-log error against NFE: every sampler of ours (thin), the best-per-NFE envelopes of ours and
    k-diffusion's (thick), and the paper's Heun."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.images import save_figure
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for key, errors in ours.items():
        ax.plot(list(errors), list(errors.values()), "-", color="tab:blue", alpha=0.15, linewidth=0.8)
    for key, errors in theirs.items():
        ax.plot(list(errors), list(errors.values()), "-", color="tab:orange", alpha=0.15, linewidth=0.8)
    nfes = sorted({n for errors in ours.values() for n in errors})
    for results, color, label in ((ours, "tab:blue", "ours, best per NFE"),
                                  (theirs, "tab:orange", "k-diffusion, best per NFE")):
        best = best_per_nfe(results, nfes)
        ax.plot(list(best), [e for _, e in best.values()], "o-", color=color, linewidth=2.2, label=label)
    heun = ours.get("heun:edm", {})
    ax.plot(list(heun), list(heun.values()), "s--", color="k", label="paper's Heun, EDM steps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network calls)")
    ax.set_ylabel("RMS end-point error / data scale")
    ax.set_title("Gaussian mixture, 64 dims: error against NFE (thin: every sampler and schedule)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)

# ----------------------------------------------------------------------------
# Command line.


def _int_list(ctx, param, value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


@click.group()
def main():
    """Samplers against NFE."""


@main.command()
@click.option("--out", metavar="JSON", default="benchmarks/results/samplers-mixture.json", show_default=True)
@click.option("--plot", metavar="PNG", default="benchmarks/results/samplers-mixture.png", show_default=True)
@click.option("--num", type=click.IntRange(min=1), default=1024, show_default=True, help="Latents (end points)")
@click.option("--nfe", "nfes", metavar="LIST", default=",".join(map(str, NFES)), show_default=True,
              callback=_int_list)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the latents (the problem's is 0)")
def mixture(out, plot, num, nfes, seed):
    """Error against NFE on the Gaussian mixture, ours and k-diffusion's; a table, JSON and a log-log plot."""
    torch.set_num_threads(1)
    net = GaussianMixtureDenoiser()
    latents = torch.randn([num, *net.shape], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    start = time.time()
    exact = exact_end_points(net, latents)
    print(f"Exact end points of {num} latents (RK4, 4096 steps) in {time.time() - start:.1f} s", flush=True)
    ours = our_errors(net, latents, exact, nfes)
    K = load_k_diffusion()
    theirs = k_diffusion_errors(K, net, latents, exact, nfes) if K is not None else {}
    record = dict(problem=dict(dim=net.dim, components=len(net.stds), data_scale=net.data_scale, latents=num,
                               seed=seed, truth="RK4 in log sigma, 4096 steps"),
                  nfes=nfes, ours=ours, k_diffusion=theirs)
    if theirs:
        record["goal"] = {nfe: dict(ours=best_per_nfe(ours, [nfe])[nfe], k_diffusion=best_per_nfe(theirs, [nfe])[nfe])
                          for nfe in GOAL_NFES if nfe in nfes}
        print("\n" + goal_table(ours, theirs, [n for n in GOAL_NFES if n in nfes]))
    atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    plot_errors(ours, theirs, plot)
    print(f"Wrote {out} and {plot}")


def _sampler_specs(ctx, param, value: str) -> list[tuple[str, str | None]]:
    specs = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        name, _, schedule = item.partition(":")
        if name not in SAMPLERS:
            raise click.BadParameter(f"'{name}': expected one of {', '.join(SAMPLERS)}")
        specs.append((name, schedule or None))
    return specs


def fid_against_nfe(network: str, ref_path: str, seeds: list[int], nfes: list[int], specs, batch: int,
                    device: str | None) -> dict[str, dict[int, dict]]:
    """{'NAME:SCHEDULE': {nfe: {fid, calls}}}: FID of each sampler's images for ``seeds`` against ``ref_path``,
    the images made in memory exactly as generate.py makes them (training.sampling.generation.generated_features)."""
    from metrics.detector import load_detector
    from metrics.evaluate import compute_metrics
    from metrics.reference import load_reference
    from torch_utils.distributed import pick_device
    from training.sampling.generation import generated_features, load_sampling_network

    device = pick_device(device)
    net, decode = load_sampling_network(network, device)
    detector = load_detector(None, device=device)
    ref = load_reference(ref_path)
    results = {}
    for name, schedule in specs:
        key = f"{name}:{schedule or SAMPLERS[name].time_steps}"
        results[key] = {}
        for nfe in nfes:
            solver = SAMPLERS[name].solver
            if nfe < solver.min_nfe:
                continue
            start = time.time()
            if schedule is not None and schedule.startswith("optimized"):  # The one-time search, timed apart.
                SAMPLERS[name].levels(net, torch.zeros([1], device=device), nfe, schedule, 0.002, 80, 7)
            search_seconds, start = time.time() - start, time.time()
            features = generated_features(net, seeds, detector, device, batch, progress=False, decode=decode,
                                          sampler=NamedSampler(name, nfe=nfe, time_steps=schedule))
            fid = compute_metrics(features, ref, ["fid"])["fid"]
            results[key][nfe] = dict(fid=fid, calls=solver.calls_for(solver.levels_for(nfe)),
                                     seconds=time.time() - start, search_seconds=search_seconds)
            print(f"  {key} NFE {nfe}: FID {fid:.3f} ({time.time() - start:.0f} s)", flush=True)
    return results


def plot_fid(results: dict, path: str, num_images: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.images import save_figure
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for key, rows in results.items():
        ax.plot([r["calls"] for r in rows.values()], [r["fid"] for r in rows.values()], "o-", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network calls per image)")
    ax.set_ylabel(f"FID ({num_images} images)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


@main.command()
@click.option("--network", required=True, metavar="PKL|URL", help="Network to sample")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL", help="Reference statistics (fid.py ref)")
@click.option("--num", type=click.IntRange(min=2), default=1000, show_default=True, help="Images per FID (seeds 0..)")
@click.option("--nfe", "nfes", metavar="LIST", default="10,15,20,35,50", show_default=True, callback=_int_list)
@click.option("--samplers", "specs", metavar="LIST", default="heun,unipc_bh2:optimized,dpmpp_3m:optimized,"
              "ipndm:loguniform,dpmpp_2m:loguniform", show_default=True, callback=_sampler_specs,
              help="NAME or NAME:SCHEDULE, comma-separated")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, ...  [default: cuda if available]")
@click.option("--search-evals", type=click.IntRange(min=1), default=None,
              help="Sampler runs of each 'optimized' search  [default: training.sampling.SEARCH_MAX_EVALS]")
@click.option("--search-batch", type=click.IntRange(min=1), default=None,
              help="Latents of each 'optimized' search  [default: training.sampling.SEARCH_BATCH]")
@click.option("--out", metavar="JSON", default="benchmarks/results/samplers-fid.json", show_default=True)
@click.option("--plot", metavar="PNG", default="benchmarks/results/samplers-fid.png", show_default=True)
def fid(network, ref_path, num, nfes, specs, batch, device, search_evals, search_batch, out, plot):
    """FID against NFE on a trained network, for Heun and the best few samplers; JSON and a plot."""
    from training import sampling
    sampling.SEARCH_MAX_EVALS = search_evals or sampling.SEARCH_MAX_EVALS
    sampling.SEARCH_BATCH = search_batch or sampling.SEARCH_BATCH
    results = fid_against_nfe(network, ref_path, list(range(num)), nfes, specs, batch, device)
    record = dict(network=network, ref=ref_path, num_images=num, nfes=nfes, results=results)
    atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    plot_fid(results, plot, num)
    print("\n| sampler:schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    for key, rows in results.items():
        print(f"| {key} | " + " | ".join(f"{rows[n]['fid']:.2f}" if n in rows else "" for n in nfes) + " |")
    print(f"Wrote {out} and {plot}")


if __name__ == "__main__":
    main()
