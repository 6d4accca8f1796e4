"""Exponential moving average of a model's parameters: a thin wrapper over torch-ema.

torch_ema.ExponentialMovingAverage does the averaging; this wrapper adds what training and sampling need around it:
the warm-up decay min(decay, (1 + n) / (10 + n)) switched by one flag, an update count kept even without warm-up,
a `state_dict` of plain values and tensors that round-trips exactly (and loads with `torch.load(weights_only=True)`),
and a context that swaps the averaged weights in and puts the trained ones back bit for bit.

    ema = EMA(model, decay=0.9999)
    ...; optimizer.step(); ema.update()
    with ema.sampling(model):  # the averaged weights, eval mode, the random states untouched afterwards
        images = diffusion.sample(model, ...)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch_ema import ExponentialMovingAverage


class EMA:
    """EMA of `model.parameters()` (buffers are not averaged; our UNet has none that train).

    Args:
        model: the module whose parameters are tracked (the unwrapped one: DDP and torch.compile share its
            parameter tensors, so updates made through a wrapper are seen here).
        decay: the decay once warm-up is over.
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so that early averages are not dominated by the
            random initialisation; False gives the plain `decay` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.warmup = bool(warmup)
        self._names = [name for name, _ in model.named_parameters()]
        self._ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=self.warmup)
        # torch-ema only counts updates when it uses the count; we keep it always (logging, resume checks).
        self._num_updates = 0

    @property
    def decay(self) -> float:
        """The decay after warm-up."""
        return self._ema.decay

    @property
    def num_updates(self) -> int:
        """How many times `update()` has been called (restored by `load_state_dict`)."""
        return self._num_updates

    def update(self) -> None:
        """Fold the model's current parameters into the average; call after every optimizer step."""
        self._ema.update()
        self._num_updates += 1

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into `model` (default: the tracked model), e.g. a fresh UNet for sampling."""
        if model is None:
            self._ema.copy_to()
            return
        names = [name for name, _ in model.named_parameters()]
        if names != self._names:
            raise ValueError(f"EMA.copy_to: the model's parameters ({len(names)}) do not match the EMA's "
                             f"({len(self._names)})")
        self._ema.copy_to(model.parameters())

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Swap the averaged weights into the tracked model for the block; the trained weights come back exactly."""
        try:
            with self._ema.average_parameters():
                yield
        finally:
            # torch-ema keeps the stored copy after restoring; drop it so it is neither held in memory nor saved.
            self._ema.collected_params = None

    @contextlib.contextmanager
    def sampling(self, model: nn.Module) -> Iterator[None]:
        """Sample from the averaged weights in the middle of training without changing what training sees: the EMA
        weights swapped into `model` (the tracked module) in eval mode, and afterwards the trained weights, the mode and
        the global random states (the CPU's and the model's GPU's) put back as they were."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with self.average_parameters(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                yield
        finally:
            model.train(was_training)

    def state_dict(self) -> dict:
        """Plain values and a list of tensors (copies, so later updates do not change a dict being saved)."""
        return {
            "decay": self._ema.decay,
            "warmup": self.warmup,
            "num_updates": self._num_updates,
            "param_names": list(self._names),
            "shadow_params": [p.detach().clone() for p in self._ema.shadow_params],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; tensors are moved to the tracked parameters' device and dtype."""
        names = state_dict.get("param_names")
        if names is not None and list(names) != self._names:
            raise ValueError("EMA.load_state_dict: the saved parameter names do not match the model's")
        shadow = list(state_dict["shadow_params"])
        if len(shadow) != len(self._names):
            raise ValueError(f"EMA.load_state_dict: {len(shadow)} saved tensors for {len(self._names)} parameters")
        self.warmup = bool(state_dict.get("warmup", self.warmup))
        num_updates = int(state_dict["num_updates"] or 0)
        self._ema.load_state_dict({
            "decay": float(state_dict["decay"]),
            "num_updates": num_updates if self.warmup else None,
            "shadow_params": shadow,
            "collected_params": None,
        })
        self._num_updates = num_updates
