"""G-Adam and G-RMSprop: Adam and RMSprop on the basis-path values of a ReLU network's chain
blocks (the coordinates G-SGD steps), as `torch.optim.Optimizer`s.

Usage::

    model = MLP(49, 10, width=64, depth=2)
    opt = GAdam(model, lr=1e-3)           # sets skeleton weights to 1, as GSGD does
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

The rule (equations in `gsgd_cli.gspace.adaptive`'s docstring and the README): every basis path
of a chain block is one coordinate; its gradient is G-SGD's (Inverse-Chain-Rule); torch's Adam
/ RMSprop rule moves it (bias correction, `eps`, `betas` / `alpha`, `amsgrad`, `centered`,
`momentum`, `maximize` exactly as torch's); the new values go back to the weights by G-SGD's
Weight-Allocation with the free skeleton weights fixed. Weight decay is coupled L2 on the
weights (`dw += wd * w` before the G-space gradient, as `GSGD` and `torch.optim.Adam`); `bpr`
is G-SGD's basis-path regulariser. Parameters outside every chain block take torch's own Adam /
RMSprop step (its functional form) with the same hyper-parameters.

The blocks, structural options, warnings, frozen layers, copies and the structure record are
GSGD's (`gspace_optimizer.GSpaceOptimizer`); see `GSGD`'s docstring for `skeleton_init`, `bn`,
`block_split`, `valleys` and `input_shape`. The state is per parameter, shaped like it, under
torch's names (`adaptive_eager`'s docstring). A step is computed out of place, checked
(gradients and new values finite, no pivot shrinking below `min_pivot_ratio`) and written only
if every check passed; otherwise it raises `GAdamStepError` / `GRMSpropStepError` at once and
writes nothing (on CUDA the check waits for the device once per step). On the CPU the blocks'
step runs in one fused kernel (`adaptive_fused`, `native/gadam.py`; `fused=`), elsewhere the
eager step (`adaptive_eager`); the choice is made once per set of blocks."""
from __future__ import annotations

import warnings
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..gspace.adaptive import AdamOptions, RMSpropOptions
from ._common import SGD_NEUTRAL, check_group_keys
from .adaptive_eager import diag_size, eager_step
from .errors import GAdamStepError, GRMSpropStepError, StepError
from .gsgd_diag import step_error
from .gspace_optimizer import GSpaceOptimizer
from .adaptive_fused import fused_step
from .native.gadam import available as fused_available
from .validation import check_betas, check_flag, check_lr, check_nonnegative

__all__ = ["GAdam", "GRMSprop"]

# torch.optim.Adam's / RMSprop's implementation flags (e.g. from a state loaded into the group):
# accepted with the values that describe what these optimizers do.
ADAPTIVE_NEUTRAL = {**SGD_NEUTRAL, "capturable": (False,), "decoupled_weight_decay": (False,)}
G_SPACE_KEYS = frozenset({"lr", "eps", "weight_decay", "maximize", "bpr", "min_pivot_ratio"})


class _AdaptiveGSpace(GSpaceOptimizer):
    """The step shared by GAdam and GRMSprop: plan, check, write (see the module doc)."""

    label: ClassVar[str]                 # the step's name in messages ("G-Adam")
    own_keys: ClassVar[frozenset]
    _copied = ("fused",)

    def _options(self, group: dict):
        raise NotImplementedError

    def _record_size(self) -> int:
        return diag_size(self._plans, len(self._outside))

    def _step_error(self) -> StepError:
        step, after, diag = self._step_record.take()
        group = self.param_groups[0]
        return step_error(step, after, diag, self._plans, self._outside,
                          dict(zip(map(id, group["params"]), self._param_names)), group["lr"],
                          group["min_pivot_ratio"], error_cls=self.step_error, label=self.label,
                          outside_rule=self.outside_rule)

    @torch.no_grad()
    def step(self, closure=None):
        """One step: every block's G-space step and the outside parameters' torch step,
        computed and checked before anything is written."""
        loss = self._run_closure(closure)
        group = self.param_groups[0]
        check_group_keys(self.name, group, self.own_keys, ADAPTIVE_NEUTRAL, self._structure)
        self._check_model()
        options = self._options(group)
        self._leave_blocks_outside()
        record = self._record_on(group["params"][0].device)
        args = (self._plans, self.state, options, group["maximize"], group["min_pivot_ratio"],
                self._outside, record)
        written = self._fused_step(*args)
        if written is None:
            written = eager_step(*args)
        if not written:                      # nothing was written
            raise self._step_error()
        return loss

    def _fused_step(self, *args) -> bool | None:
        """The step in the fused CPU kernel (`native/gadam.py`), or None where it does not
        apply. Whether to use it is decided once, at the first step on these blocks."""
        if self._native is None:
            tensors = [t for plan in self._plans for t in plan.params]
            self._native = self.fused is not False and fused_available(tensors)
            if self.fused is True and not self._native:
                warnings.warn(f"{self.name}(fused=True): the fused step needs float32/float64 "
                              "contiguous CPU parameters and a C++ compiler; using the eager "
                              "step", RuntimeWarning, stacklevel=3)
        return fused_step(*args) if self._native else None


def _common_checks(model, lr, eps, weight_decay, bpr, min_pivot_ratio, maximize, fused) -> None:
    check_lr(lr)
    if fused not in (None, True, False):
        raise ValueError(f"Invalid fused={fused!r}. Must be None, True or False.")
    for name, value in (("eps", eps), ("weight_decay", weight_decay), ("bpr", bpr),
                        ("min_pivot_ratio", min_pivot_ratio)):
        check_nonnegative(name, value)
    check_flag("maximize", maximize)


class GAdam(_AdaptiveGSpace):
    """G-Adam: Adam on the basis-path values of the model's chain blocks.

    Args (torch.optim.Adam's, with its defaults): `lr`, `betas`, `eps`, `weight_decay`
    (coupled L2, as Adam's), `amsgrad`, `maximize`; G-SGD's: `bpr`, `min_pivot_ratio` (a step
    that shrinks a pivot below this fraction of its magnitude raises `GAdamStepError`),
    `skeleton_init`, `bn`, `block_split`, `valleys`, `input_shape` (see `GSGD`); `fused`:
    `None` (default) the fused CPU kernel where it applies (float32/float64 contiguous CPU
    parameters), the eager step elsewhere; `False` always the eager step; `True` as `None`,
    with a warning where the kernel does not apply. Both compute the same step (to rounding)."""

    name = "GAdam"
    label = "G-Adam"
    record_key = "gadam"
    step_error = GAdamStepError
    outside_rule = "plain Adam"
    state_name = "G-space Adam moments"
    own_keys = G_SPACE_KEYS | {"betas", "amsgrad"}

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9,
                 0.999), eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, bpr: float = 0.0, min_pivot_ratio: float = 1e-6,
                 skeleton_init: str = "one", bn: str = "approx", block_split: str = "none",
                 valleys: str = "split", input_shape: Sequence[int] | None = None,
                 fused: bool | None = None):
        self._check_model_argument(model)
        _common_checks(model, lr, eps, weight_decay, bpr, min_pivot_ratio, maximize, fused)
        self.fused = fused
        betas = check_betas(betas)
        check_flag("amsgrad", amsgrad)
        self._setup(model, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                amsgrad=amsgrad, maximize=maximize, bpr=bpr,
                                min_pivot_ratio=min_pivot_ratio),
                    skeleton_init=skeleton_init, bn=bn, block_split=block_split,
                    valleys=valleys, input_shape=input_shape, strict=True)

    def _options(self, group: dict) -> AdamOptions:
        return AdamOptions(lr=group["lr"], betas=check_betas(group["betas"]), eps=group["eps"],
                           weight_decay=group["weight_decay"],
                           amsgrad=check_flag("amsgrad", group["amsgrad"]),
                           maximize=group["maximize"], bpr=group["bpr"])


class GRMSprop(_AdaptiveGSpace):
    """G-RMSprop: RMSprop on the basis-path values of the model's chain blocks.

    Args (torch.optim.RMSprop's, with its defaults): `lr`, `alpha`, `eps`, `weight_decay`
    (coupled L2), `momentum`, `centered`, `maximize`; G-SGD's: `bpr`, `min_pivot_ratio`,
    `skeleton_init`, `bn`, `block_split`, `valleys`, `input_shape`, `fused` (see `GAdam`)."""

    name = "GRMSprop"
    label = "G-RMSprop"
    record_key = "grmsprop"
    step_error = GRMSpropStepError
    outside_rule = "plain RMSprop"
    state_name = "G-space RMSprop averages"
    own_keys = G_SPACE_KEYS | {"alpha", "momentum", "centered"}

    def __init__(self, model: nn.Module, lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, *, maximize: bool = False, bpr: float = 0.0,
                 min_pivot_ratio: float = 1e-6, skeleton_init: str = "one",
                 bn: str = "approx", block_split: str = "none", valleys: str = "split",
                 input_shape: Sequence[int] | None = None, fused: bool | None = None):
        self._check_model_argument(model)
        _common_checks(model, lr, eps, weight_decay, bpr, min_pivot_ratio, maximize, fused)
        self.fused = fused
        check_nonnegative("alpha", alpha)
        check_nonnegative("momentum", momentum, below=1)
        check_flag("centered", centered)
        self._setup(model, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                momentum=momentum, centered=centered, maximize=maximize,
                                bpr=bpr, min_pivot_ratio=min_pivot_ratio),
                    skeleton_init=skeleton_init, bn=bn, block_split=block_split,
                    valleys=valleys, input_shape=input_shape, strict=True)

    def _options(self, group: dict) -> RMSpropOptions:
        return RMSpropOptions(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                              weight_decay=group["weight_decay"], momentum=group["momentum"],
                              centered=check_flag("centered", group["centered"]),
                              maximize=group["maximize"], bpr=group["bpr"])
