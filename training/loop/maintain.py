"""Once per tick of the training loop: the status line, snapshots and sample grids, in-training metrics, stats and
training states. None of it changes what is trained: the training generators are left as they were."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from torch_utils import distributed as dist
from torch_utils.misc import clone_module
from training.checkpoint import save_network_pkl
from training.images import save_image_grid
from training.loop.monitor import monitoring_sampler, network_label
from training.loop.progress import format_time
from training.loop.schedules import ema_halflife_nimg
from training.loop.setup import Run, plain
from training.loop.state import capture_rng_state, restore_rng_state
from training.run_files import power_snapshot_name, samples_name, snapshot_name, state_name


@dataclass
class Tick:
    start_nimg: int
    start_time: float
    maintenance_sec: float               # Time spent between the previous tick's end and this tick's start.
    first: bool = False                  # Tick 0 of a run ends after one step (as the official); a resumed run
                                         # continues the tick schedule instead.


# The status line: (label, stat name, format of the shown value) per field, in the order shown. Each field is
# also reported as that stat; the total time is shown through format_time.
STATUS_FIELDS = (
    ("tick", "Progress/tick", "<5d"),
    ("kimg", "Progress/kimg", "<9.3f"),
    ("time", "Timing/total_sec", "<12s"),
    ("sec/tick", "Timing/sec_per_tick", "<7.1f"),
    ("sec/kimg", "Timing/sec_per_kimg", "<7.2f"),
    ("maintenance", "Timing/maintenance_sec", "<6.1f"),
    ("cpumem", "Resources/cpu_mem_gb", "<6.2f"),
    ("gpumem", "Resources/peak_gpu_mem_gb", "<6.2f"),
    ("reserved", "Resources/peak_gpu_mem_reserved_gb", "<6.2f"),
)


def tick_measurements(run: Run, tick: Tick) -> dict[str, float]:
    """The numbers of the status line, by stat name, measured now (GPU peaks since the last reset)."""
    now = time.time()
    gib = 2 ** 30
    on_cuda = run.device.type == "cuda"
    tick_sec = now - tick.start_time
    return {
        "Progress/tick": run.state.cur_tick,
        "Progress/kimg": run.state.cur_nimg / 1e3,
        "Timing/total_sec": now - run.start_time,
        "Timing/sec_per_tick": tick_sec,
        "Timing/sec_per_kimg": tick_sec / max(run.state.cur_nimg - tick.start_nimg, 1) * 1e3,
        "Timing/maintenance_sec": tick.maintenance_sec,
        "Resources/cpu_mem_gb": psutil.Process(os.getpid()).memory_info().rss / gib,
        "Resources/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(run.device) / gib if on_cuda else 0.0,
        "Resources/peak_gpu_mem_reserved_gb": torch.cuda.max_memory_reserved(run.device) / gib if on_cuda else 0.0,
    }


def status_line(values: dict[str, float], latest_metrics: dict[str, float] | None = None) -> str:
    """``tick 3     kimg 1.536     time 2m 05s ...`` from ``tick_measurements``, then the latest in-training
    metrics of the EMA (``fid 12.34``) when there are some."""
    shown = dict(values)
    shown["Timing/total_sec"] = format_time(values["Timing/total_sec"])
    fields = [f"{label} {shown[stat]:{spec}}" for label, stat, spec in STATUS_FIELDS]
    fields += [f"{name} {value:<7.4g}" for name, value in (latest_metrics or {}).items()]
    return " ".join(fields)


def report_progress(run: Run, tick: Tick) -> None:
    """The status line (rank 0) and the same numbers in the stats."""
    values = tick_measurements(run, tick)
    for _label, stat, _spec in STATUS_FIELDS:
        run.stats.report0(stat, values[stat])
    total_sec = values["Timing/total_sec"]
    run.stats.report0("Timing/total_hours", total_sec / 3600)
    run.stats.report0("Timing/total_days", total_sec / 86400)
    run.stats.report0("Progress/lr", run.state.optimizer.param_groups[0]["lr"])
    halflife = ema_halflife_nimg(run.state.cur_nimg, run.config.ema_halflife_kimg, run.config.ema_rampup_ratio)
    run.stats.report0("Progress/ema_halflife_kimg", halflife / 1000)
    if hasattr(run.loss_fn, "stage"):  # Consistency tuning: the stage of the tick's last step.
        run.stats.report0("Progress/ct_stage", run.loss_fn.stage)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.log.print(status_line(values, run.metrics.latest if run.metrics is not None else None))


def save_snapshot(run: Run) -> str:
    """``network-snapshot-KKKKKK.pkl`` in the official format, plus a sample grid from the EMA; with power-function
    EMAs also one ``network-snapshot-KKKKKKK-S.SSS.pkl`` per sigma_rel, the official EDM2 names that
    ``reconstruct_phema.py`` reads (``training.run_files``)."""
    path = os.path.join(run.config.run_dir, snapshot_name(run.state.cur_nimg))
    if dist.is_main():
        emas = {path: run.state.ema}
        if run.state.phema is not None:
            emas.update((os.path.join(run.config.run_dir, power_snapshot_name(run.state.cur_nimg, std)), module)
                        for std, module in run.state.phema.emas.items())
        for ema_path, module in emas.items():
            ema = clone_module(module, device="cpu").eval().requires_grad_(False)
            data = dict(ema=ema, loss_fn=run.loss_fn, augment_pipe=run.augment_pipe,
                        dataset_kwargs=plain(run.config.dataset_kwargs))
            if run.config.encoder_kwargs:  # Latents: the official EDM2 code, and ours, decode through it.
                data["encoder"] = run.encoder
            save_network_pkl(ema_path, data)
        if run.config.grid_images:
            save_sample_grid(run, os.path.join(run.config.run_dir, samples_name(run.state.cur_nimg)))
    return path


def grid_seeds(run: Run) -> list[int]:
    return list(range(run.config.grid_images))


def save_data_grid(run: Run) -> None:
    """The first grid: training images, for comparison with the samples."""
    if dist.is_main() and run.config.grid_images:
        count = min(run.config.grid_images, len(run.dataset_obj))
        images = np.stack([run.dataset_obj[i][0] for i in range(count)])
        if run.config.encoder_kwargs:  # Raw latents: their means, decoded.
            raw = torch.from_numpy(images).to(run.device)
            with torch.no_grad():
                images = run.encoder.decode(run.encoder.encode_latents(raw, sample=False))
        save_image_grid(images, os.path.join(run.config.run_dir, "samples-data.png"))


@torch.no_grad()
def save_sample_grid(run: Run, path: str) -> None:
    """Images from the EMA network for fixed seeds (``monitoring_sampler``: EDM's Heun with a few steps)."""
    from training.sampling import generate_images, to_uint8

    decode = run.encoder.decode if run.config.encoder_kwargs else to_uint8
    images = generate_images(run.state.ema, grid_seeds(run), device=run.device, decode=decode,
                             sampler=monitoring_sampler(run.loss_fn, run.config.grid_steps))
    save_image_grid(images, path)


def save_state(run: Run) -> str:
    path = os.path.join(run.config.run_dir, state_name(run.state.cur_nimg))
    run.state.save(path, run.device)
    return path


def evaluate_metrics(run: Run) -> None:
    """FID/KID of the EMA and of each power-function EMA, in memory, for seeds 0..N-1 (all processes take part);
    one line each in ``metrics.jsonl``, TensorBoard and the log."""
    networks = {network_label(): run.state.ema}
    if run.state.phema is not None:
        networks.update((network_label(std), module) for std, module in run.state.phema.emas.items())
    records = run.metrics.evaluate(networks, run.state.cur_nimg / 1e3)
    run.log.write_metrics(records)
    for r in records:
        run.log.print(f"{r['metric'].upper()} {r['value']:g} ({r['network']}, {r['num_images']} images, "
                      f"{r['seconds']:.1f} s)")


def due_every(tick: int, every: int | None, done: bool, skip_first: bool = False) -> bool:
    """Whether something done every ``every`` ticks (None: never) is due at ``tick``: at multiples of ``every``,
    and at the end of the run; with ``skip_first``, not at tick 0."""
    if every is None:
        return False
    return done or ((tick != 0 or not skip_first) and tick % every == 0)


def maintain(run: Run, tick: Tick, done: bool, stop_requested: bool) -> None:
    """Once per tick: status line, snapshot and sample grid, metrics, stats, training state. Leaves the
    training generators as they were, so that where ticks fall (and whether metrics are on) never changes the
    trained weights."""
    state = run.state
    report_progress(run, tick)
    snapshot = due_every(state.cur_tick, run.config.snapshot_ticks, done)
    measure = run.metrics is not None and run.metrics.due(state.cur_tick, done, snapshot)
    if snapshot or measure:
        rng = capture_rng_state(run.device)
        if snapshot:
            save_snapshot(run)
        if measure:
            evaluate_metrics(run)
        restore_rng_state(rng, run.device)
    dump = stop_requested or due_every(state.cur_tick, run.config.state_dump_ticks, done, skip_first=True)
    run.log.write_stats(run.stats.collect(), state.cur_nimg / 1e3)
    state.cur_tick += 1  # A saved state resumes with the next tick.
    if dump:
        path = save_state(run)
        if stop_requested:
            run.log.print(f"Stop requested (SIGTERM): saved {path}")
