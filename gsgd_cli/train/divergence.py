"""When a run diverges: the optimizers' step errors, the iteration a failed step belongs to,
the check that a checkpoint never holds non-finite weights, and the one-line message."""
from __future__ import annotations

from typing import Any

import torch


def divergence_errors() -> tuple[type[BaseException], ...]:
    """Exceptions an optimizer raises instead of writing non-finite weights."""
    import importlib

    found = []
    for module, name in (("gsgd_cli.optim.errors", "StepError"),):   # the one family
        try:  # the optimizer modules are optional for the trainer
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def failed_iteration(trainer: Any, exc: BaseException, current: int) -> int:
    """The iteration of a failed optimizer step: `exc.step` counts the optimizer's step()
    calls, which began at this fit's first iteration (else: the `current` iteration)."""
    step = getattr(exc, "step", None)
    return current if step is None else trainer._fit_start + step


def diverged(trainer: Any, cause: str, iteration: int) -> str:
    trainer.status = "diverged"
    trainer.iteration = iteration - 1           # the last iteration that completed normally
    kept = (f"kept the last good checkpoint {trainer.checkpoint_path} (iteration "
            f"{trainer.checkpoint_iteration})" if trainer.checkpoint_iteration is not None
            else "no checkpoint had been written yet")
    lr = trainer.base_lrs[0] * trainer.schedule.factor(iteration - 1, trainer.iterations_per_epoch)
    trainer.message = (f"training diverged: {cause} at iteration {iteration} (lr={lr:.4g}); "
                    f"stopped and {kept}. Try a smaller learning rate.")
    return trainer.message


def weights_finite(trainer: Any) -> bool:
    """Checked before each checkpoint, so that a checkpoint never holds NaN/Inf weights
    (all ranks agree)."""
    state = [t for t in trainer.model.state_dict().values() if t.is_floating_point()]
    finite = (bool(torch.stack([torch.isfinite(t).all() for t in state]).all())
              if state else True)
    return not trainer.ranks.any(not finite)
