"""Learning-rate schedules as pure functions of the iteration: constant, multistep, exponential.

The trainer sets `lr = base_lr * factor(iteration)` on every param group before each step, so
the schedule has no hidden state besides the base learning rates (kept in the checkpoint).
`unit` says whether milestones / decay steps count iterations or epochs; epoch-based ones
change the rate at epoch boundaries (epoch = iteration // iterations_per_epoch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gsgd_cli.errors import UserError

KINDS = ("constant", "multistep", "exponential")
UNITS = ("epoch", "iteration")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    unit: str = "epoch"
    milestones: tuple[int, ...] = field(default_factory=tuple)  # multistep
    gamma: float = 0.1  # factor per milestone (multistep) or per unit (exponential)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"Invalid schedule.name={self.kind!r}. Must be one of: "
                            f"{', '.join(KINDS)} (e.g. schedule=multistep).")
        if self.unit not in UNITS:
            raise UserError(f"Invalid schedule.unit={self.unit!r}. Must be 'epoch' or 'iteration'.")
        if not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise UserError(f"Invalid schedule.gamma={self.gamma!r}. Must be a number > 0.")
        ms = tuple(self.milestones)
        if any(not isinstance(m, int) or m < 0 for m in ms) or list(ms) != sorted(ms):
            raise UserError(f"Invalid schedule.milestones={list(ms)}. Must be increasing "
                            "non-negative integers, e.g. schedule.milestones=[100,150].")
        object.__setattr__(self, "milestones", ms)

    def factor(self, iteration: int, iterations_per_epoch: int) -> float:
        """Multiplier of the base learning rate used for step number `iteration` (0-based)."""
        t = iteration if self.unit == "iteration" else iteration // iterations_per_epoch
        if self.kind == "multistep":
            return self.gamma ** sum(t >= m for m in self.milestones)
        if self.kind == "exponential":
            return self.gamma ** t
        return 1.0
