r"""Exact Path-SGD (Neyshabur, Salakhutdinov and Srebro, 2015), the baseline of G-SGD's section 5.3.

Update rule (p = 2 path regulariser, see ``shared/notes/gsgd-math.md`` section 7)::

    phi(w)^2  = sum over input->output paths P of  prod_{e in P} w_e^2
    kappa_e   = d phi(w)^2 / d (w_e^2)
              = sum over the paths through e of the product of the OTHER squared weights
              = gamma_in(a)^2 * gamma_out(b)^2                      for e = (a -> b)
    w_e      <- w_e - lr * (dL/dw_e) / (kappa_e + eps) * rho

Symbols -> arguments: ``lr`` is eta (the learning rate, the only value an ``lr_scheduler``
changes), ``eps`` is the optional floor added to kappa (default 0: exact Path-SGD), ``rho`` is
1 unless ``rescale`` is set (see below). ``dL/dw_e`` is ``p.grad``; it is read, never modified.

How kappa is computed and which networks are supported (anything else raises ``ValueError``
naming the module or operation): see `gsgd_cli.pathnorm.squared_copy`; the step's math is
`gsgd_cli.pathnorm.step`, this class gathers the tensors and chooses the fused or eager path.

``input_shape`` (the input's shape without the batch dimension) is inferred only when the first
parameterised layer is an ``nn.Linear`` reached from the input through flatten/ReLU/dropout only
(then it is ``(in_features,)``); conv nets must pass it, e.g. ``PathSGD(model, lr,
input_shape=(3, 32, 32))``.

Deviations from the published Path-SGD code (used as the baseline by the G-SGD authors), on
purpose:

* it stored ``model.parameters()`` as a generator and exhausted it at the first step, so from the
  second step on it trained with plain SGD; here kappa is recomputed and applied every step;
* it never zeroed the copy's gradients, so kappa accumulated over steps; here
  ``torch.autograd.grad`` gives a fresh kappa each step;
* it backpropagated ``||f(1)||^2`` of a batch of two all-ones rows instead of ``sum f(1)``, which
  is not phi^2 (outputs are weighted by themselves); here the sum is used;
* it multiplied the update by a ratio ``rho = sqrt(sum_p ||g_p|| / sum_p ||g_p/kappa_p||^2)``
  (unsquared norms over squared ones) computed on the first batch and then frozen. Here no ratio
  is applied by default (``rescale=None``). ``rescale='first'`` applies the consistent version
  ``rho = ||g|| / ||g / kappa||`` (global Euclidean norms over all parameters with a gradient),
  computed on the first step and then frozen (kept in ``state``, so it survives ``state_dict``
  round trips); ``rescale='every'`` recomputes it every step, so each update has the Euclidean
  norm of the plain SGD step ``lr * g``. Either rescaling breaks the exact invariance of Path-SGD
  under positive rescaling of hidden units (rho depends on the representation), which is why it is
  off by default.

Guard: if kappa + eps is exactly 0 for an entry whose update is needed, or an update is not
finite, the step changes no weight and ``PathSGDStepError`` (a ``RuntimeError``) names the
parameter; the message's first line is self-contained (for a trainer's log). The check runs on
the device and gates the writes there, so ``step`` never waits for the device: the error is
raised by ``check_steps()`` (a trainer calls it where it synchronises anyway) or by a later
``step`` (at once on the CPU), and the steps in between write nothing either
(``gsgd_cli.optim.step_record``). ``strict=True`` waits for the check in every step and raises
at once.

Not supported: momentum and weight decay (Path-SGD's paper has neither for this baseline),
several param groups (all parameters of the model are one group, in ``model.parameters()``
order), sparse gradients.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..pathnorm import step as F_path
from ..pathnorm.squared_copy import build_squared_copy, needs_input_shape, take_squared_weights
from ._common import SGD_NEUTRAL, check_group_keys
from .base import ModelOptimizer
from .errors import PathSGDStepError
from .native.path_sgd import FusedPathStep, fused_step
from .step_record import StepRecord
from .validation import check_input_shape, check_lr, check_nonnegative

__all__ = ["PathSGD", "PathSGDStepError", "needs_input_shape"]

# Keys in the optimizer's param group / state.
LR = "lr"
EPS = "eps"
RESCALE = "rescale"
RESCALE_RATIO = "rescale_ratio"
_RESCALE_CHOICES = (None, "first", "every")
INPUT_SHAPE = "input_shape"
MAXIMIZE = "maximize"
STATE_RECORD = "path_sgd"      # the structure record's key in state_dict()


class PathSGD(ModelOptimizer):
    """Exact Path-SGD; see the module docstring for the rule, supported layers and deviations.

    Args:
        model: the ``nn.Module`` to train (not its parameters). All its parameters form one param
            group, in ``model.parameters()`` order.
        lr: learning rate eta (a finite number > 0).
        rescale: ``None`` (default, exact Path-SGD), ``'first'`` or ``'every'``: multiply the
            update by ``rho = ||g|| / ||g / kappa||``, frozen after the first step or recomputed
            every step (a consistent version of the published code's ratio; not invariant).
        eps: added to kappa before dividing (default 0.0; > 0 breaks the exact invariance).
        input_shape: the input's shape without the batch dimension; required for conv nets.
        strict: ``False`` (default): the guard runs on the device and a failed step is raised
            later (``check_steps()`` or the next ``step``); ``True``: every step waits for it.
        fused: ``None`` (default) / ``True``: on the CPU (float32/float64), the division, the
            guard and the update run in one kernel (``native/path_sgd.py``: one read and one write pass
            per parameter); ``False``: always the tensor operations of ``step``. Same result.
        maximize: Path-SGD on ``-loss``, as ``torch.optim.SGD``'s flag.

    ``input_shape`` is fixed once built: in ``param_groups[0]`` for the record, recorded in
    ``state_dict()``, and a state saved with another one is refused. A step refuses param-group
    keys it would ignore (e.g. SGD's ``momentum=0.9`` from an SGD state_dict). Copies
    (``copy.deepcopy``, ``pickle``, ``torch.save(opt)``) keep their own squared-weight copy and
    step exactly like the original.
    """

    name = "PathSGD"
    record_key = STATE_RECORD
    step_error = PathSGDStepError

    def __init__(self, model: nn.Module, lr: float = 0.01, *, rescale: Optional[str] = None,
                 eps: float = 0.0, input_shape: Optional[Sequence[int]] = None,
                 strict: bool = False, fused: Optional[bool] = None,
                 maximize: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}. Must be a torch.nn.Module "
                            "(PathSGD takes the model, not its parameters).")
        lr = check_lr(lr)
        eps = check_nonnegative("eps", eps)
        if not (rescale is None or (isinstance(rescale, str) and rescale in _RESCALE_CHOICES)):
            raise ValueError(f"Invalid rescale={rescale!r}. Must be None, 'first' or 'every'.")
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize={maximize!r}. Must be True or False.")
        if strict not in (True, False):
            raise ValueError(f"Invalid strict={strict!r}. Must be True or False.")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused={fused!r}. Must be None, True or False.")
        self.strict = strict
        self.fused = fused
        self._native: Optional[FusedPathStep] = None
        self._step_record: Optional[StepRecord] = None
        input_shape = check_input_shape(input_shape)

        model = self._unwrap(model)    # torch.compile, DataParallel, DDP share the parameters
        named = list(model.named_parameters())
        if not named:
            raise ValueError("Invalid model: it has no parameters.")
        params = [p for _, p in named]
        self._param_names = [n for n, _ in named]

        # The private squared-weight copy: deep-copied once, eval mode, traced, pools squared.
        shadow = copy.deepcopy(model).eval()
        for p in shadow.parameters():
            p.requires_grad_(True)
        inferred = self._build_shadow(shadow)
        if input_shape is None:
            if inferred is None:
                raise ValueError(
                    "PathSGD needs input_shape for this model (its first layer is not an "
                    "nn.Linear reached by flatten/ReLU only, e.g. a conv net): pass "
                    "input_shape=(C, H, W), the shape of one input without the batch dimension; "
                    "kappa of a convolution depends on the image size.")
            input_shape = inferred
        self._input_shape = input_shape

        defaults = {LR: lr, EPS: eps, RESCALE: rescale, INPUT_SHAPE: input_shape,
                    MAXIMIZE: maximize}
        super().__init__(params, defaults)

        # Trial run: the input shape must fit, and the output must be one tensor.
        try:
            kappas = self._compute_kappa()
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"PathSGD could not run the squared-weight copy on an all-ones input "
                             f"of shape (1, *{input_shape}): {type(exc).__name__}: {exc}. Check "
                             "input_shape.") from exc
        del kappas

    # -- torch.optim.Optimizer plumbing ---------------------------------------------------------
    def _build_shadow(self, shadow: nn.Module) -> Optional[tuple]:
        """Trace the squared-weight copy `shadow` (a deep copy of the model; the traced module
        shares its parameters) and square its poolings; returns the inferred input shape."""
        gm, inferred = build_squared_copy(shadow)
        self._shadow_model = shadow        # what copies of the optimizer rebuild from
        self._used = take_squared_weights(gm, self._param_names)
        self._shadow = gm
        # Whether each model parameter lies on a path (the weight or bias of an
        # nn.Linear/nn.Conv2d used in forward); one that does not may not have a gradient.
        on_path = set(self._used)
        self._on_path = [k in on_path for k in range(len(self._param_names))]
        return inferred

    def _record_size(self) -> int:
        return 3 * len(self.param_groups[0]["params"])     # per parameter: see plan_update

    def _record(self) -> dict:
        return {INPUT_SHAPE: list(self._input_shape), "param_names": list(self._param_names)}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pathsgd_structure"] = {**self._record(), "shadow": self._shadow_model,
                                       "fused": self.fused, "strict": self.strict}
        return state

    def __setstate__(self, state: dict) -> None:
        structure = state.pop("_pathsgd_structure", None)
        super().__setstate__(state)
        if structure is not None:            # a copy: deepcopy, pickle, torch.save(opt)
            self._param_names = list(structure["param_names"])
            self._input_shape = tuple(structure[INPUT_SHAPE])
            self._build_shadow(structure["shadow"])
            self.fused = structure["fused"]
            self.strict = structure["strict"]
            self._native = None
            self._step_record = None
        for group in self.param_groups:
            group.setdefault(EPS, 0.0)
            group.setdefault(RESCALE, None)
            group.setdefault(MAXIMIZE, False)
            group.setdefault(INPUT_SHAPE, self._input_shape)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by `state_dict()`; refuses one saved with another input shape or
        for other parameters, and one from another optimizer."""
        record = state_dict.get(STATE_RECORD)
        groups = state_dict.get("param_groups") or [{}]
        if record is None and not {EPS, RESCALE} <= set(groups[0]):
            raise ValueError("this state_dict was not saved by PathSGD; PathSGD cannot use "
                             "another optimizer's state: start PathSGD afresh instead")
        if record is not None:
            saved = tuple(record[INPUT_SHAPE])
            if saved != self._input_shape:
                raise ValueError(f"the state_dict was saved by PathSGD with input_shape={saved}, "
                                 f"this PathSGD has input_shape={self._input_shape}: build it "
                                 f"with input_shape={saved} to load this state")
            for k, (a, b) in enumerate(zip(record["param_names"], self._param_names)):
                if a != b:
                    raise ValueError(f"the state_dict's parameter {k} is '{a}', this PathSGD's "
                                     f"is '{b}': load it into a PathSGD built on the same model")
        super().load_state_dict(self._without_record(state_dict))

    def _check_group(self, group: dict) -> None:
        """Refuse param-group keys the step would ignore (SGD's momentum, nesterov, ...)."""
        check_group_keys("PathSGD", group, {LR, EPS, RESCALE, MAXIMIZE},
                         {**SGD_NEUTRAL, "momentum": (0, 0.0), "weight_decay": (0, 0.0)},
                         {INPUT_SHAPE: self._input_shape})


    # -- kappa -----------------------------------------------------------------------------------
    def _compute_kappa(self) -> list[Optional[torch.Tensor]]:
        return F_path.kappa(self._shadow, self._used, self.param_groups[0]["params"],
                            self._input_shape)

    def compute_kappa(self) -> list[Optional[torch.Tensor]]:
        """kappa for every parameter at the current weights (``None`` where not applicable)."""
        return self._compute_kappa()

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One Path-SGD step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = self._run_closure(closure)
        group = self.param_groups[0]
        self._check_group(group)
        params = group["params"]
        record = self._record_on(params[0].device)
        if record.visible_failure():
            raise self._step_error()
        lr, eps, rescale = group[LR], group[EPS], group[RESCALE]
        if group[MAXIMIZE]:
            lr = -lr                       # Path-SGD on -loss: the step's sign flips
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        if not idx:
            return loss
        for i in idx:
            if params[i].grad.is_sparse:
                raise RuntimeError(f"PathSGD does not support sparse gradients "
                                   f"(parameter '{self._param_names[i]}').")
            if not self._on_path[i]:
                raise RuntimeError(
                    f"PathSGD: parameter '{self._param_names[i]}' has a gradient but is not the "
                    "weight or bias of an nn.Linear/nn.Conv2d used in forward, so it lies on no "
                    "path; freeze it (requires_grad=False) or use another optimizer for it.")
        with torch.no_grad():
            kappa_all = self._compute_kappa()
            if self._fused_step(params, kappa_all, record, lr, eps, rescale):
                if self.strict:
                    self.check_steps()
                return loss
            ps = [params[i] for i in idx]
            grads = [params[i].grad for i in idx]
            kappas = [kappa_all[i] for i in idx]
            updates, ok, diag = F_path.plan_update(grads, kappas, lr, eps, idx, len(params))
            gate = record.update(ok, diag)
            if self.strict:
                self.check_steps()
                gate = None
            else:
                updates = [torch.where(gate, u, 0.0) for u in updates]
            if rescale is not None:
                ratio = self._rescale_ratio(rescale, grads, updates, params[0], gate)
                torch._foreach_mul_(updates, ratio)
            F_path.apply_update(ps, updates, lr)
        if not self.strict:
            record.publish()
        return loss

    def _fused_step(self, params, kappas, record: StepRecord, lr, eps, rescale) -> bool:
        """The division, guard and update in the fused CPU kernel; False when it does not
        apply (then the tensor operations run)."""
        return fused_step(self, params, kappas, record, lr, eps, rescale)

    def _rescale_ratio(self, rescale, grads, updates, first_param, gate) -> torch.Tensor:
        state = self.state[first_param]
        stored = state.get(RESCALE_RATIO)
        ratio, new = F_path.rescale_ratio(rescale, grads, updates, stored, gate)
        if new is not None:
            if stored is not None:           # in place: a captured CUDA graph keeps using it
                stored.copy_(new)
            else:
                state[RESCALE_RATIO] = new
        return ratio

    def _step_error(self) -> PathSGDStepError:
        step, after, diag = self._step_record.take()
        params = self.param_groups[0]["params"]
        tail = ("" if after == 0 else
                f" (This was step {step}; the {after} step(s) after it wrote nothing either.)")
        for i, (name, p) in enumerate(zip(self._param_names, params)):
            n_zero, bad_update, bad_grad = diag[3 * i:3 * i + 3]
            shape = tuple(p.shape)
            if n_zero:
                return PathSGDStepError(
                    f"PathSGD: kappa is 0 but the gradient is not for {int(n_zero)} of "
                    f"{p.numel()} entries of parameter '{name}' {shape}: no path with non-zero "
                    "weights runs through them, so that gradient did not come from "
                    "backpropagating through this model. Check what sets .grad, or pass eps > 0 "
                    "to divide by kappa + eps (not exactly invariant)." + tail, step, after)
            if bad_update:
                lr = self.param_groups[0][LR]
                what = ("its gradient is not finite" if bad_grad else
                        f"lr * gradient / kappa is not finite (lr={lr:g}; or kappa under- or "
                        "overflows)")
                return PathSGDStepError(
                    f"PathSGD: non-finite update for parameter '{name}' {shape}: {what}. Lower "
                    "lr, check the loss for NaN/Inf, or train in float64; eps > 0 bounds the "
                    "step where kappa underflows." + tail, step, after)
        return PathSGDStepError(f"PathSGD step {step} failed." + tail, step, after)

