"""A training run's budget and bookkeeping, as plain values, checked once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gsgd_cli.errors import UserError


@dataclass
class TrainSettings:
    """Budget and bookkeeping. Set `iterations` to budget in iterations, else `epochs` counts."""

    epochs: int | None = 3
    iterations: int | None = None
    batch_size: int = 64
    eval_every: int | None = None  # iterations between evaluations; None = once per epoch
    eval_batch_size: int = 1000
    checkpoint_every: int | None = 1000  # iterations; None or 0 = only at the end
    seed: int = 0
    progress: bool | None = None  # None = show a progress bar only on a terminal
    tensorboard: bool = True
    dtype: torch.dtype = torch.float32
    sync_every: int = 1000   # iterations between device syncs at the latest (1: every iteration)
    cuda_graphs: bool = False    # replay the training step as a CUDA graph (CUDA only)
    keep_best: str | None = None  # keep the model with the best value of this metric (best.py)

    def validate(self) -> None:
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"Invalid train.{name}={value!r}. Must be a positive integer"
                                + (" or null." if allow_none else "."))

        if self.iterations is None and self.epochs is None:
            raise UserError("No training budget: set train.epochs=N or train.iterations=N.")
        positive("iterations", self.iterations, allow_none=True)
        if self.iterations is None:
            positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("eval_every", self.eval_every, allow_none=True)
        positive("eval_batch_size", self.eval_batch_size)
        if self.checkpoint_every not in (None, 0):
            positive("checkpoint_every", self.checkpoint_every)
        positive("sync_every", self.sync_every)
