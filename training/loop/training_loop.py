"""The training loop of the paper (Section 5, Appendix F): Adam on the denoising loss of training/loss.py,
with learning-rate ramp-up, EMA of the weights, optional non-leaking augmentation, on any number of
processes (``torchrun``) or one.

It reads as three parts: ``setup`` (distributed, data, network, optimizer, state; ``setup.py``), ``train_step``
(loss, backward, accumulate, update, EMA; ``step.py``) and ``maintain`` (log, snapshot, state, stats;
``maintain.py``). Multi-process training uses ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), which averages
gradients over ranks; in a world of one the network is used directly.
"""

from __future__ import annotations

import gc
import signal
import time

import torch

from torch_utils import distributed as dist
from training.loop.config import TrainingConfig
from training.loop.maintain import Tick, maintain, save_data_grid
from training.loop.progress import format_time
from training.loop.setup import Run, setup
from training.loop.state import TrainingState
from training.loop.step import train_step


def release(run: Run) -> None:
    """Free the DDP wrapper and the data stream now, and let every rank get here, so that no rank tears down
    the process group (or exits) while another still holds objects that use it."""
    run.ddp = run.forward = run.data = None
    gc.collect()
    dist.barrier()


class StopRequest:
    """Why to stop early: SIGTERM (e.g. SLURM pre-emption; the loop saves a state at the next step and exits
    cleanly) or a wall-clock deadline (the loop ends as if the duration were reached, with a final snapshot).
    All ranks agree on both, so none waits for the others in a collective call."""

    def __init__(self, device: torch.device, deadline: float | None = None):
        self.device = device
        self.deadline = deadline  # time.time() value, or None.
        self.requested = False
        self._previous = None
        self._pending: torch.Tensor | None = None  # The flags summed over ranks at the previous step.
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> tuple[bool, bool]:
        """(any rank got SIGTERM, any rank passed the deadline). With several processes the flags are summed
        asynchronously and the sum started at one step is read at the next, when the device has long finished
        it: the host never waits for the current step (every rank still stops at the same step, one step later)."""
        flags = [self.requested, self.deadline is not None and time.time() >= self.deadline]
        if dist.get_world_size() == 1:
            return flags[0], flags[1]
        previous = self._pending
        # Fill kernels, not torch.tensor(..., device=): a host-to-device copy from pageable memory would block.
        local = torch.full([2], float(flags[0]), device=self.device)
        local[1:].fill_(float(flags[1]))
        self._pending = dist.all_reduce_sum(local)
        if previous is None:
            return False, False
        sigterm, late = previous.tolist()
        return sigterm > 0, late > 0

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def training_loop(config: TrainingConfig | None = None, **kwargs) -> TrainingState:
    """Train until ``total_kimg`` thousand images have been seen, ``max_minutes`` have passed since the call
    (setup included), or SIGTERM; returns the final state. Takes a ``TrainingConfig`` or its fields as keywords
    (the official ``training_loop(**c)`` call)."""
    config = TrainingConfig(**kwargs) if config is None else config
    start_time = time.time()
    run = setup(config, start_time)
    state = run.state
    if state.cur_nimg == 0:
        save_data_grid(run)
    deadline = None if config.max_minutes is None else start_time + config.max_minutes * 60
    stop = StopRequest(run.device, deadline=deadline)
    run.log.print(f"Training from {state.cur_nimg / 1e3:g} to {config.total_nimg / 1e3:g} kimg "
                  f"({dist.get_world_size()} processes on {run.device.type}, batch {config.batch_size} = "
                  f"{run.batch_gpu} x {run.accumulation_rounds} rounds x {dist.get_world_size()})")
    tick = Tick(start_nimg=state.cur_nimg, start_time=time.time(), maintenance_sec=time.time() - start_time,
                first=state.cur_tick == 0)
    try:
        while True:
            train_step(run)
            stopping, out_of_time = stop.agreed()
            done = state.cur_nimg >= config.total_nimg or out_of_time
            if out_of_time and state.cur_nimg < config.total_nimg:
                run.log.print(f"Time limit of {config.max_minutes:g} min reached at {state.cur_nimg / 1e3:g} kimg")
            if done or stopping or tick.first or state.cur_nimg >= tick.start_nimg + config.kimg_per_tick * 1000:
                tick_end = time.time()
                maintain(run, tick, done, stopping)
                if done or stopping:
                    break
                tick = Tick(start_nimg=state.cur_nimg, start_time=time.time(), maintenance_sec=time.time() - tick_end)
    finally:
        stop.restore()
        release(run)
    run.log.print(f"Done: {state.cur_nimg / 1e3:g} kimg in {format_time(time.time() - run.start_time)}; "
                  f"results in {config.run_dir}")
    run.log.close()
    return state
