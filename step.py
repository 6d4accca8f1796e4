"""One training step, shared by train.py and the benchmarks (bench/train_step.py times exactly this code).

    loss, grad_norm = train_step(net, state, diffusion, x0, amp=autocast(device, "fp16"), generator=noise_gen)

The diffusion loss under autocast (its maths in fp32 inside `loss`), the backward through the GradScaler (fp16 only;
bf16 and fp32 need no loss scaling), unscaling and clipping by the global gradient norm, the optimizer update (skipped
when the gradients are not finite), the learning-rate schedule and the EMA update.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from diffusion import Draws, GaussianDiffusion
from utills import TrainState


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
                   ) -> torch.optim.AdamW:
    """AdamW, with the fused CUDA kernel on a GPU (one launch for all parameters instead of one per tensor)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def train_step(net: torch.nn.Module, state: TrainState, diffusion: GaussianDiffusion, x0: torch.Tensor, *,
               amp: contextlib.AbstractContextManager, generator: torch.Generator | None = None,
               draws: Draws | None = None, cond: torch.Tensor | None = None, p_uncond: float = 0.0,
               p_free: float = 0.0, grad_clip: float = 0.0, accum: int = 1, poison: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of `state` (its model, optimizer, scaler, scheduler and EMA) on the batch x0; returns the loss
    (detached) and the gradient norm before clipping, both still on the device.

    net: the module to call (the model itself, or its DDP / torch.compile wrapper); state.model is the plain module.
    draws: the batch's random inputs (GaussianDiffusion.draws, this rank's rows); else they come from `generator`.
    accum: forward and backward in this many micro-batches, the gradients accumulated (DDP synchronises only after
    the last); each micro-batch's loss is weighted by its share of the rows, so the update is that of the whole batch.
    grad_clip: clip the global gradient norm to this (0: no clipping; the norm is computed anyway, for the log).
    poison: make the loss NaN (the test hook of the non-finite guard).
    """
    optimizer, scaler = state.optimizer, state.scaler
    b = x0.shape[0]
    if not 1 <= accum <= b:
        raise ValueError(f"accum {accum}: needs 1..{b} (the rows of this rank's batch)")
    if accum > 1 and draws is None:
        raise ValueError("accum > 1 needs the batch's draws (so that they do not depend on the micro-batches)")

    # Forward and backward under autocast per micro-batch; the diffusion maths runs in fp32 inside loss().
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=x0.device)
    bounds = [b * k // accum for k in range(accum + 1)]
    for k in range(accum):
        rows = slice(bounds[k], bounds[k + 1])
        last = k == accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with amp:
                loss = diffusion.loss(net, x0[rows], cond=None if cond is None else cond[rows], p_uncond=p_uncond,
                                      generator=generator, p_free=p_free,
                                      draws=None if draws is None else draws.rows(rows))
            if poison:
                loss = loss * float("nan")
            share = (rows.stop - rows.start) / b
            scaler.scale(loss * share if accum > 1 else loss).backward()
        total += loss.detach().float() * share
    loss = total

    # Unscale, clip by the global norm, and update unless the gradients are not finite.
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip or float("inf"))
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the update on inf/NaN gradients and lowers the scale
        scaler.update()
    elif bool(torch.isfinite(grad_norm)):  # one read-back per step: bf16/fp32 have no scaler to skip for us
        optimizer.step()
    with warnings.catch_warnings():  # stepping the schedule after a skipped update is intended
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        state.scheduler.step()

    # The EMA follows every step (a skipped update leaves the weights, and so the average, as they were).
    state.ema.update()
    return loss.detach(), grad_norm
