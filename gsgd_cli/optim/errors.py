"""The one family of step errors: an optimizer that refuses to write a step raises a subclass of
`StepError`, so a trainer catches `StepError` whatever the optimizer."""
from __future__ import annotations

__all__ = ["StepError", "GSGDStepError", "PathSGDStepError", "GAdamStepError",
           "GRMSpropStepError", "GSGDWarning"]


class StepError(RuntimeError):
    """A step that would write non-finite weights (or divide 0/0); nothing was written.
    `step` is the number of the failed `step()` call (1 = the first), `steps_after` the number of
    calls after it before the error was raised (they wrote nothing either)."""

    def __init__(self, message: str, step: int | None = None, steps_after: int = 0):
        super().__init__(message)
        self.step = step
        self.steps_after = steps_after


class GSGDStepError(StepError):
    """A G-SGD step would write a non-finite value or divide by a vanished pivot; it wrote
    nothing. `step` is the number of the failed `step()` call of the optimizer (1 = its first),
    `steps_after` how many calls came after it before the error was raised (they wrote nothing
    either)."""


class GAdamStepError(StepError):
    """A G-Adam step would write a non-finite value or divide by a vanished pivot; it wrote
    nothing (neither weights nor moments). `step` and `steps_after` as `GSGDStepError`'s."""


class GRMSpropStepError(StepError):
    """A G-RMSprop step would write a non-finite value or divide by a vanished pivot; it wrote
    nothing (neither weights nor averages). `step` and `steps_after` as `GSGDStepError`'s."""


class GSGDWarning(UserWarning):
    """What a G-space optimizer (GSGD, GAdam, GRMSprop) tells the user about the model it was
    given (filter it like any warning)."""


class PathSGDStepError(StepError):
    """A Path-SGD step that would divide 0/0 or write non-finite weights; nothing was written.
    `step` is the number of the failed `step()` call (1 = the first), `steps_after` the number of
    calls after it before the error was raised (they wrote nothing either)."""
