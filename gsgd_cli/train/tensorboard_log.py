"""TensorBoard beyond the evaluation scalars (`evaluation.record` writes those): the composed
config and G-SGD's coverage as text when a fit starts, and the training loss of every
iteration, written at the sync points (`train.sync_every`, evaluations, checkpoints) from the
values the trainer has just checked, so logging adds no wait for the device."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

LOSS_PER_ITERATION = "train_loss_iteration"
LR_PER_ITERATION = "lr_iteration"


def write_start(writer: Any, config: dict[str, Any] | None, optimizer: Any, step: int) -> None:
    if config is not None:
        text = json.dumps(config, indent=2, default=str)
        writer.add_text("config", "```\n" + text + "\n```", step)
    describe = getattr(optimizer, "describe", None)   # G-SGD: blocks, m, H, what takes SGD
    if callable(describe):
        writer.add_text("gsgd_coverage", "```\n" + describe() + "\n```", step)
        coverage = getattr(optimizer, "_coverage", None)
        if coverage is not None and coverage.total:
            writer.add_scalar("gsgd_coverage_share", coverage.in_blocks / coverage.total, step)


def write_losses(writer: Any, first_iteration: int, losses: Sequence[float],
                 lr_of: Callable[[int], float]) -> None:
    """`losses[k]` is the loss of iteration `first_iteration + k` (1-based iterations), trained
    at learning rate `lr_of(first_iteration + k)`."""
    for k, value in enumerate(losses):
        writer.add_scalar(LOSS_PER_ITERATION, value, first_iteration + k)
        writer.add_scalar(LR_PER_ITERATION, lr_of(first_iteration + k), first_iteration + k)
