"""G-SGD (Meng et al., ICLR 2019) as a `torch.optim.Optimizer`.

Usage::

    model = MLP(49, 10, width=64, depth=2)
    opt = GSGD(model, lr=0.01)            # sets skeleton weights to 1 (paper, appendix 11.3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60])
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

The optimizer takes the model, not a parameter list: it traces the model once to find its
chain blocks (`gspace.blocks`, `joins`, `coverage`, over the table `graph.ops`) and builds each
block's skeleton (`gspace.skeleton`). This class holds options, state and dispatch only (its
base, `optim.base.ModelOptimizer`, the plumbing); `step()` runs plain SGD on the values of the
basis paths (the coordinates of G-space, `gspace.update`), mapped back to the weights with the
free skeleton weights fixed: eagerly (`gsgd_eager`: plan every block, check on the device with
`gsgd_diag`, apply gated by the check) or, on the CPU, in one fused kernel (`native/gsgd.py`).
Parameters outside every chain block take a plain SGD step with the same learning rate;
`describe()` lists them with the reason. Nothing in `step()` waits for the device unless
`strict=True`; a failed check is raised by `check_steps()` or a later `step()`.

Symbols of the paper and their arguments: `eta_t` is `lr` (per step, so schedulers work);
the skeleton weights' initial value 1 is `skeleton_init="one"`; `"keep"` keeps the model's
values (any sign) instead. Free skeleton weights never change after construction.

Checkpoints: construct the optimizer *before* loading a saved model state (construction with
`skeleton_init="one"` overwrites the skeleton weights, and says so in a `GSGDWarning`), then
load the model and optimizer states, or pass `skeleton_init="keep"` when wrapping an already
trained model. `state_dict()` records the structural options and the block layout;
`load_state_dict` refuses a state saved under other ones. Copies (`copy.deepcopy`, `pickle`,
`torch.save(opt)`) rebuild the blocks from that record and step exactly like the original.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from ..gspace.update import StepOptions
from ._common import SGD_NEUTRAL, check_group_keys
from .errors import GSGDStepError, GSGDWarning
from .gsgd_blocks import momentum_buffer
from .gsgd_diag import diagnose, step_error
from .gsgd_eager import apply_all, plan_all, sgd_outside
from .gspace_optimizer import BN_OPTIONS, GSpaceOptimizer
from .native.gsgd import diag_size, fused_step
from .step_record import StepRecord
from .validation import check_lr, check_nonnegative

__all__ = ["GSGD", "GSGDStepError", "GSGDWarning", "BN_OPTIONS"]

# Keys of the param group that every step reads.
STEP_KEYS = frozenset({"lr", "momentum", "weight_decay", "bpr", "min_pivot_ratio", "maximize"})
STATE_RECORD = "gsgd"           # the structure record's key in state_dict()


class GSGD(GSpaceOptimizer):
    """G-SGD: SGD in the positively scale-invariant space of a ReLU network.

    Args:
        model: the network; its chain blocks are found by tracing it with torch.fx.
        lr: learning rate `eta` (a finite number > 0).
        skeleton_init: `"one"` (default) sets every skeleton weight to 1 at construction, as
            the paper does; `"keep"` keeps the current values (none may be 0); `"rescale"`
            rescales hidden units (a positive scaling: the network function is unchanged)
            so that every free skeleton weight becomes +1 or -1; the pivots then carry the
            paths' scale. The paper (appendix 11.3) notes that the magnitudes of the skeleton
            weights set the scale of the learning rate: with `"keep"` and `"rescale"` tune
            `lr` afresh. Deep networks without batch norm explode at initialisation with
            `"one"` (their kernel centres set to 1).
        min_pivot_ratio: a step that shrinks a pivot to less than this fraction of its
            magnitude (or to 0) raises `GSGDStepError` instead of dividing the weights
            downstream by a vanishing number.
        bn: `"approx"` (default) lets chains run through batch norm and applies the paper's
            approximation (appendix 11.2, eqs. 39-40): the gradient of every incoming weight
            of a channel followed by batch norm is multiplied by the norm of that channel's
            whole incoming filter before the G-space step. It is an approximation: batch norm
            makes each filter scale-invariant by itself, which is not the chain's invariance.
            `"approx_per_tap"`: the published code's variant, the norm over input channels
            only, per output channel and kernel position (not the paper's filter norm).
            `"split"`: batch norm ends a chain (the layers around it take plain SGD unless
            they form chains of their own).
        momentum: heavy-ball momentum `mu` on the basis-path gradient (`b <- mu b + g`,
            `v <- v - lr b`); its buffers live in v-space in `state` (per edge under
            `"momentum_buffer"`, per pivot under `"pivot_momentum_buffer"` of the pivot layer's
            weight) and survive `state_dict()` round trips. Parameters outside chain blocks
            use SGD's momentum.
        weight_decay: L2 on the weights, as in `torch.optim.SGD`: `dw <- dw + wd * w` before
            the G-space step (not invariant under rescaling).
        bpr: basis-path regularisation coefficient `lambda`: the smooth regulariser
            `lambda * (sum_{P+} v_p^2 + sum_{P-} log(|v_p|)^2)` over the basis paths (P-: the
            all-skeleton paths, P+: the paths with one non-skeleton weight) is added to the
            loss inside the optimizer, i.e. `2 lambda v_p` resp. `2 lambda log|v_p| / v_p` is
            added to each basis path's gradient. This is the smooth form of the basis-path
            norm of Zheng et al. (AAAI 2019) that the paper pairs with G-SGD (appendix 11.5).
        block_split: `"none"` (default): each chain found is one block, e.g. the whole
            plain network from stem to classifier. `"stage"`: one block per run of
            equal-width layers (per stage, as the published code does); the layers that change
            the width (stem, stride-2 transitions, classifier) then take plain SGD.
        fused: `None` (default): the fused CPU kernel (`native/gsgd.py`: one read and one write
            pass per layer, compiled on first use) for float32/float64 models on the CPU, the
            eager step elsewhere. `True`: the same (with a warning if the kernel cannot be
            built); `False`: always the eager step, the readable reference of
            `gsgd_cli.gspace.update`. Both compute the same step (to rounding).
        strict: `False` (default): `step()` never waits for the device; a failed check writes
            nothing and is raised as `GSGDStepError` by `check_steps()` or by a later `step()`
            (see `gsgd_cli.optim.step_record`). `True`: every `step()` waits for its checks and
            raises at once.
        valleys: a hidden layer narrower than layers on both sides (a width valley) cannot be
            a hidden layer of one block (see `gsgd_cli.gspace.skeleton`). `"split"` (default):
            the block is split there into exact blocks whose boundary is the valley (G-SGD is
            then not invariant to rescaling the valley's nodes; a one-layer part takes plain
            SGD); `"refuse"`: raise `UnsupportedWidthProfile` naming the layer.
        input_shape: one input's shape without the batch dimension, e.g. `(3, 32, 32)`. With
            it the shapes of every value are propagated (fake tensors, nothing is computed) and
            every flatten or reshape between two layers is checked exactly; without it only
            the usual `flatten(x, 1)` of a convolution's output joins two layers (a reshape of
            a Linear layer's output then ends the chain, with a note). `gsgd train` passes it.
        maximize: G-SGD on `-loss` (the gradients' sign flipped), as `torch.optim.SGD`'s flag.

    On construction a `GSGDWarning` says what share of the trainable parameters lies in G-space
    when it is not all, and why the rest is outside (`describe()` gives the full table), and
    warns when a block's step cannot be represented in the parameters' dtype.

    `skeleton_init`, `bn`, `block_split`, `valleys` and `input_shape` shape the blocks when the
    optimizer is built: they are in `param_groups[0]` (and `repr`) for the record, and a step
    refuses a changed value.
    A step also refuses keys it would ignore (e.g. SGD's `nesterov=True`). A layer frozen after
    construction (`requires_grad_(False)`) sends its block to plain SGD, as freezing before.
    """

    name = "GSGD"
    record_key = STATE_RECORD
    step_error = GSGDStepError
    outside_rule = "plain SGD"
    state_name = "G-space momentum"
    _copied = ("fused", "strict")

    def __init__(self, model: nn.Module, lr: float = 0.01, *, skeleton_init: str = "one",
                 momentum: float = 0.0, weight_decay: float = 0.0, bpr: float = 0.0,
                 min_pivot_ratio: float = 1e-6, bn: str = "approx", block_split: str = "none",
                 valleys: str = "split", input_shape: Sequence[int] | None = None,
                 maximize: bool = False, fused: bool | None = None, strict: bool = False):
        self._check_model_argument(model)
        check_lr(lr)
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay),
                            ("bpr", bpr), ("min_pivot_ratio", min_pivot_ratio)):
            check_nonnegative(name, value)
        if momentum >= 1:
            raise ValueError(f"Invalid momentum={momentum!r}. Must be a number in [0, 1).")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused={fused!r}. Must be None, True or False.")
        self.fused = fused
        self._setup(model, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, bpr=bpr,
                                min_pivot_ratio=min_pivot_ratio, maximize=maximize),
                    skeleton_init=skeleton_init, bn=bn, block_split=block_split,
                    valleys=valleys, input_shape=input_shape, strict=strict)

    # -- per-step checks (called at the top of step()) ---------------------------------------
    def _check_group(self, group: dict) -> None:
        """Refuse param-group keys that the step would ignore (e.g. SGD's nesterov)."""
        check_group_keys("GSGD", group, STEP_KEYS, SGD_NEUTRAL, self._structure)

    # -- torch.optim.Optimizer plumbing -------------------------------------------------------
    def _record_size(self) -> int:
        return diag_size([len(plan.weights) for plan in self._plans], len(self._outside))

    def _group_defaults(self) -> dict:
        return {"min_pivot_ratio": 1e-6, "momentum": 0.0, "weight_decay": 0.0, "bpr": 0.0,
                "maximize": False}

    def _load_without_record(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups") or [{}]
        if not {"bpr", "min_pivot_ratio"} <= set(groups[0]):
            super()._load_without_record(state_dict)
        warnings.warn("this GSGD state_dict has no structure record (it passed through "
                      "a tool that keeps only 'state' and 'param_groups', e.g. torch."
                      "distributed.checkpoint, or an older version saved it): its block "
                      "layout cannot be checked", GSGDWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, closure=None):
        """One G-SGD step: plan every block (nothing written), check them all on the device,
        apply (the writes gated by the check). Never waits for the device unless `strict`."""
        loss = self._run_closure(closure)
        group = self.param_groups[0]
        self._check_group(group)
        self._check_model()
        record = self._record_on(group["params"][0].device)
        if record.visible_failure():
            raise self._step_error()
        self._leave_blocks_outside()
        record = self._record_on(group["params"][0].device)   # anew if the blocks changed
        options = StepOptions(group["lr"], group["momentum"], group["weight_decay"],
                              group["bpr"], group["min_pivot_ratio"])
        maximize = group["maximize"]
        if not self._fused_step(options, record, maximize):
            self._eager_step(options, record, maximize)
        if self.strict:
            self.check_steps()
        else:
            record.publish()
        return loss

    # -- the eager step: the readable reference (gsgd_cli.gspace.update) ----------------------
    def _eager_step(self, options: StepOptions, record: StepRecord, maximize: bool) -> None:
        planned = plan_all(self._plans, self.state, options, maximize)   # nothing written
        gate = record.update(*diagnose(self._plans, planned, self._outside, options,
                                       record.device))     # checked on the device, no sync
        if self.strict:
            self.check_steps()            # waits for the device; raises if the check failed
            gate = None
        apply_all(planned, self.state, options, gate)       # the writes, gated by the check
        sgd_outside(self._outside, self.state, options, maximize, gate)

    # -- the fused CPU step ----------------------------------------------------------------------
    def _fused_step(self, options: StepOptions, record: StepRecord, maximize: bool) -> bool:
        """The whole step in the fused CPU kernel; False when it does not apply."""
        return fused_step(self, options, record, maximize,
                          lambda p: momentum_buffer(self.state, p))

    def _step_error(self) -> GSGDStepError:
        """The recorded failure as an exception (and the record cleared)."""
        step, after, diag = self._step_record.take()
        group = self.param_groups[0]
        return step_error(step, after, diag, self._plans, self._outside,
                          dict(zip(map(id, group["params"]), self._param_names)), group["lr"],
                          group["min_pivot_ratio"])
