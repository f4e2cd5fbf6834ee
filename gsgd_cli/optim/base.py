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
structure record travels in `state_dict()`; a hook, instance forward or parametrization changed
after construction refuses the step (`_check_model`); a block whose parameters are frozen or
partly without a gradient cannot take a G-space step (`why_not_in_gspace`)."""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..graph.watch import ModelWatch
from ._common import unwrap_model
from .errors import StepError
from .step_record import StepRecord

__all__ = ["ModelOptimizer", "why_not_in_gspace"]


def why_not_in_gspace(params, norms=()) -> Optional[str]:
    """Why a block of `params` cannot take a G-space step now, or None.

    `"frozen"`: a parameter has `requires_grad=False` (the step would rescale it);
    `"no gradient"`: some parameters have a gradient and others' `.grad` is None (torch.optim
    leaves such a parameter unchanged, a G-space step of the block would move it: its paths'
    values change with the others'). A block where no parameter has a gradient is not stepped
    at all, as torch.optim skips every such parameter, so it is no reason.
    `"batch norm in eval mode"`: one of the block's batch norms (`norms`) normalises with its
    running statistics, an affine map with an offset: not even approximately invariant."""
    if any(not norm.training for norm in norms):
        return "batch norm in eval mode"
    params = list(params)
    if not all(p.requires_grad for p in params):
        return "frozen"
    with_grad = sum(p.grad is not None for p in params)
    if 0 < with_grad < len(params):
        return "no gradient"
    return None


class ModelOptimizer(Optimizer):
    """Base of the optimizers that take the model, not its parameters (see the module doc)."""

    name: ClassVar[str]
    record_key: ClassVar[str]
    step_error: ClassVar[type[StepError]]
    _step_record: Optional[StepRecord] = None

    _watch: Optional[ModelWatch] = None     # None on copies (they hold no model)
    _held_params: Optional[list] = None      # param_groups[0]["params"] as built (copies:
    _param_names: list[str]                  # as at their first step); the names, in order

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside compile/DataParallel/DDP wrappers (they share its parameters);
        what torch.fx cannot see of it is recorded, for `_check_model` at every step."""
        model = unwrap_model(model)
        for name, module in model.named_modules():
            if getattr(module, "sparse", False) is True and any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                raise ValueError(f"{self.name} does not support sparse gradients: module "
                                 f"'{name}' ({type(module).__name__}) has sparse=True; build "
                                 "it with sparse=False (dense gradients) or freeze it")
        self._watch = ModelWatch(model)
        return model

    def _check_model(self) -> None:
        """Refuse a step (before any write) when a hook, an instance forward or a
        parametrization of the model changed since construction, or global forward hooks
        are registered (`graph.watch`); when `param_groups` is no longer the one group of
        the model's parameters found at construction; when a gradient is sparse; or inside
        `torch.inference_mode()`."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name}.step() was called inside torch.inference_mode(): "
                               "state made there (momentum buffers, ...) cannot be updated by "
                               "a later step, and kappa needs autograd; call step() outside "
                               "inference_mode (torch.no_grad() is fine)")
        if self._watch is not None:
            self._watch.check(self.name)
        groups = self.param_groups
        if self._held_params is None:     # the first step (or the first after a copy)
            self._held_params = list(groups[0]["params"])
        if len(groups) != 1:
            raise ValueError(f"{self.name}: a param group was added to opt.param_groups; "
                             f"{self.name} keeps all parameters of its model in one group and "
                             "would never step the new one: train those parameters with "
                             "another optimizer")
        params = groups[0]["params"]
        if len(params) != len(self._held_params) or any(
                p is not q for p, q in zip(params, self._held_params)):
            raise ValueError(f"{self.name}: param_groups[0]['params'] was changed after "
                             f"construction; {self.name} steps its model's blocks as found "
                             "then: freeze a parameter (requires_grad_(False)) instead of "
                             f"removing it, or build {self.name} again")
        for k, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{self.name} does not support sparse gradients (parameter "
                                 f"'{self._param_names[k]}' has one); use dense gradients")

    # -- one param group ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{self.name} keeps all parameters of its model in one param group "
                             "(the step needs the model's structure); add_param_group is not "
                             f"supported: construct {self.name} from the whole model instead")
        super().add_param_group(param_group)
        self._held_params = list(self.param_groups[0]["params"])

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
