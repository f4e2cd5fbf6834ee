"""A sync point of the training loop: the losses kept on the device since the previous one are
read, checked with the optimizer's steps, folded into the running sums and logged."""
from __future__ import annotations

import math
from typing import Any

from . import tensorboard_log
from .divergence import diverged, divergence_errors, failed_iteration
from .step import RunningSums


def sync(trainer: Any, running: RunningSums, bar, step_error: BaseException | None = None,
          ) -> str | None:
    """A sync point: fold the pending losses into the running sums and check them and the
    optimizer's steps (or take `step_error`, raised by a step of the current iteration).
    Returns why the run diverged, or None."""
    start = trainer.iteration - running.count       # iterations before the pending ones
    losses, hits = running.take()      # of the global batch: the same on every rank
    bad_loss = next((k for k, v in enumerate(losses) if not math.isfinite(v)), None)
    cause, at = None, None
    if bad_loss is not None:
        cause, at = f"loss={losses[bad_loss]}", start + bad_loss + 1
    check = getattr(trainer.optimizer, "check_steps", None)
    step_at, step_cause = None, None
    try:
        if step_error is not None:
            raise step_error
        if check is not None:
            check()
    except divergence_errors() as exc:
        step_at = failed_iteration(trainer, exc, trainer.iteration + (step_error is not None))
        step_cause = f"optimizer step failed ({str(exc).splitlines()[0]})"
    first_failure = trainer.ranks.min_or_none(step_at)    # the first failed step on any rank
    if first_failure is not None and (at is None or first_failure < at):
        at = first_failure
        cause = (step_cause if step_at == first_failure else
                 "optimizer step failed (on another process of this data-parallel run)")
    if cause is not None:
        return diverged(trainer, cause, at)
    batch = trainer.settings.batch_size
    for value, correct in zip(losses, hits):
        trainer.loss_sum += value * batch
        trainer.correct += correct
    trainer.seen += batch * len(losses)
    if trainer._writer is not None and losses:
        ipe = trainer.iterations_per_epoch   # the rate of 1-based iteration i (param group 0)
        tensorboard_log.write_losses(trainer._writer, start + 1, losses, lambda i: (
            trainer.base_lrs[0] * trainer.schedule.factor(i - 1, ipe)))
    if losses:
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return None
