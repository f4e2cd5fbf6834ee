"""The one family of step errors: an optimizer that refuses to write a step raises a subclass of
`StepError`, so a trainer catches `StepError` whatever the optimizer."""
from __future__ import annotations

__all__ = ["StepError"]


class StepError(RuntimeError):
    """A step that would write non-finite weights (or divide 0/0); nothing was written.
    `step` is the number of the failed `step()` call (1 = the first), `steps_after` the number of
    calls after it before the error was raised (they wrote nothing either)."""

    def __init__(self, message: str, step: int | None = None, steps_after: int = 0):
        super().__init__(message)
        self.step = step
        self.steps_after = steps_after
