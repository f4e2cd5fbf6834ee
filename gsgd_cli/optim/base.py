"""`ModelOptimizer`: the plumbing every optimizer built from a model shares.

A subclass (GSGD, PathSGD, and any later G-space optimizer) sets three class attributes and
implements four methods; everything else comes from here:

* `name` (for messages), `record_key` (the structure record's key in `state_dict()`),
  `step_error` (its `StepError` subclass);
* `_record()`: the structure found at construction, as plain data (written into `state_dict()`);
* `_step_error()`: the `step_error` raised for the failure that `self._step_record` holds;
* `_record_size()`: the number of diagnostic values one step writes into its `StepRecord`;
* `step(closure)`: gather the tensors, call the functional step (fused or eager, chosen once per
  call by `_fused_step`), gate the writes by `self._step_record`.

What the base class fixes for all of them: the model is unwrapped (`torch.compile`,
`DataParallel`, DDP) and all its parameters form ONE param group (`add_param_group` refuses a
second); the closure runs with gradients enabled; a failed step is raised by `check_steps()` or
the next `step()` (the record of failures lives on the device of the parameters); the
structure record travels in `state_dict()`."""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ._common import unwrap_model
from .errors import StepError
from .step_record import StepRecord

__all__ = ["ModelOptimizer"]


class ModelOptimizer(Optimizer):
    """Base of the optimizers that take the model, not its parameters (see the module doc)."""

    name: ClassVar[str]
    record_key: ClassVar[str]
    step_error: ClassVar[type[StepError]]
    _step_record: Optional[StepRecord] = None

    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        """The model inside compile/DataParallel/DDP wrappers (they share its parameters)."""
        return unwrap_model(model)

    # -- one param group ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{self.name} keeps all parameters of its model in one param group "
                             "(the step needs the model's structure); add_param_group is not "
                             f"supported: construct {self.name} from the whole model instead")
        super().add_param_group(param_group)

    # -- the step's frame -----------------------------------------------------------------------
    @staticmethod
    def _run_closure(closure: Optional[Callable[[], float]]):
        """The loss from `closure` (evaluated with gradients enabled), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _record_on(self, device: torch.device) -> StepRecord:
        """The step record on `device` (made anew when the parameters moved)."""
        if self._step_record is None or self._step_record.device != device:
            self._step_record = StepRecord(device, self._record_size())
        return self._step_record

    def check_steps(self) -> None:
        """Raise the optimizer's `StepError` if a step since the last check failed (waits for
        the device). The failed step and every step after it wrote nothing; once raised, the
        record is cleared and later steps write again."""
        if self._step_record is not None and self._step_record.failed():
            raise self._step_error()

    # -- the structure record -------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state[self.record_key] = self._record()
        return state

    def _without_record(self, state_dict: dict) -> dict:
        """`state_dict` without the structure record (what torch's loader reads)."""
        return {k: v for k, v in state_dict.items() if k != self.record_key}

    # -- what a subclass provides ---------------------------------------------------------------
    def _record(self) -> dict:
        raise NotImplementedError

    def _record_size(self) -> int:
        raise NotImplementedError

    def _step_error(self) -> StepError:
        raise NotImplementedError
