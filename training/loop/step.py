"""One optimizer step of the training loop: accumulate the gradients of the batch, set the learning rate, clean the
gradients, update the weights and the EMAs, and count the images."""

from __future__ import annotations

import contextlib

import torch

from training.loop.monitor import SigmaRecorder
from training.loop.schedules import ema_beta, learning_rate
from training.loop.setup import Run
from training.perf import as_memory_format


def accumulate_gradients(run: Run) -> None:
    """Forward and backward over this rank's share of the global batch, in ``accumulation_rounds`` passes.
    Gradients are those of the loss summed over images divided by the per-rank batch (then averaged over
    ranks by DDP): the mean over the global batch, whatever the split."""
    per_rank = run.batch_gpu * run.accumulation_rounds
    if hasattr(run.loss_fn, "set_progress"):  # Losses on a schedule of images seen (ConsistencyLoss's stages).
        run.loss_fn.set_progress(run.state.cur_nimg)
    net = SigmaRecorder(run.forward)  # The loss draws each image's sigma; the network call shows it.
    for round_idx in range(run.accumulation_rounds):
        last = round_idx == run.accumulation_rounds - 1
        sync = contextlib.nullcontext() if last or run.ddp is run.state.net else run.ddp.no_sync()
        with sync:
            images, labels = next(run.data)
            images = run.encoder.encode_latents(images.to(run.device, non_blocking=True))
            labels = drop_labels(labels.to(run.device, non_blocking=True), run.config.label_dropout)
            loss = run.loss_fn(net=net, images=as_memory_format(images, run.fast), labels=labels,
                               augment_pipe=run.augment_pipe)
            run.stats.report("Loss/loss", loss)
            if run.loss_by_sigma is not None:
                run.loss_by_sigma.report(run.stats, net.sigma, loss)
            loss.sum().mul(run.config.loss_scaling / per_rank).backward()


def drop_labels(labels: torch.Tensor, probability: float) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each image's class vector is zeroed (the network's
    'unconditional' input) with ``probability``. No random draw at all when the probability is 0."""
    if probability <= 0 or labels.ndim != 2 or labels.shape[1] == 0:
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= probability
    return labels * keep.to(labels.dtype)


def sanitize_gradients(net: torch.nn.Module) -> torch.Tensor:
    """Replace NaN by 0 and +-inf by +-1e5 in the gradients (as the official loop); returns how many
    gradient entries were not finite."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    nonfinite = sum((~g.isfinite()).sum() for g in grads) if grads else torch.zeros([])
    for g in grads:
        torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
    return nonfinite


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- lerp(net, ema, beta) = net + beta (ema - net), the official formula, over all parameters in a
    few multi-tensor kernels (bit-identical to a loop over parameters)."""
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))


def train_step(run: Run) -> None:
    """Algorithm: accumulate gradients of the batch, ramp the learning rate, clean the gradients, Adam,
    EMA, and count the images."""
    state, config = run.state, run.config
    state.optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(run)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config.optimizer_kwargs["lr"], state.cur_nimg, config.lr_rampup_kimg,
                                    config.batch_size, config.lr_decay_batches, config.total_nimg,
                                    config.lr_cooldown)
    run.stats.report0("Loss/nonfinite_grads", sanitize_gradients(state.net))
    state.optimizer.step()
    update_ema(state.ema, state.net, ema_beta(state.cur_nimg, config.batch_size, config.ema_halflife_kimg,
                                              config.ema_rampup_ratio))
    state.cur_nimg += config.batch_size
    if state.phema is not None:
        state.phema.update(state.cur_nimg, config.batch_size)
