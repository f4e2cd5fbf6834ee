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

from ..gspace.blocks import BlockLayout
from ..gspace.coverage import (BLOCK_SPLITS, VALLEY_MODES, Coverage, coverage_reasons,
                               coverage_summary, format_coverage, plan_blocks)
from ..gspace.skeleton import build_skeleton
from ..gspace.skeleton_init import SKELETON_INITS, init_skeleton
from ..gspace.update import StepOptions
from ._common import SGD_NEUTRAL, check_group_keys
from .base import ModelOptimizer
from .errors import GSGDStepError, GSGDWarning
from .gsgd_blocks import (BlockPlan, BlockRecord, check_record, momentum_buffer,
                          step_range_problems)
from .gsgd_diag import diagnose, step_error
from .gsgd_eager import apply_all, plan_all, sgd_outside
from .native.gsgd import FusedCPUStep, diag_size, fused_step
from .step_record import StepRecord
from .validation import check_input_shape, check_lr, check_nonnegative

BN_OPTIONS = ("approx", "approx_per_tap", "split")

# Keys of the param group that every step reads.
STEP_KEYS = frozenset({"lr", "momentum", "weight_decay", "bpr", "min_pivot_ratio", "maximize"})
STATE_RECORD = "gsgd"           # the structure record's key in state_dict()


class GSGD(ModelOptimizer):
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

    def __init__(self, model: nn.Module, lr: float = 0.01, *, skeleton_init: str = "one",
                 momentum: float = 0.0, weight_decay: float = 0.0, bpr: float = 0.0,
                 min_pivot_ratio: float = 1e-6, bn: str = "approx", block_split: str = "none",
                 valleys: str = "split", input_shape: Sequence[int] | None = None,
                 maximize: bool = False, fused: bool | None = None, strict: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GSGD takes the model (an nn.Module), got {type(model).__name__}; "
                            "write GSGD(model, lr) rather than GSGD(model.parameters(), lr)")
        check_lr(lr)
        if skeleton_init not in SKELETON_INITS:
            raise ValueError(f"Invalid skeleton_init={skeleton_init!r}. Must be one of "
                             f"{', '.join(repr(s) for s in SKELETON_INITS)}.")
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay),
                            ("bpr", bpr), ("min_pivot_ratio", min_pivot_ratio)):
            check_nonnegative(name, value)
        if momentum >= 1:
            raise ValueError(f"Invalid momentum={momentum!r}. Must be a number in [0, 1).")
        for name, value, choices in (("bn", bn, BN_OPTIONS), ("block_split", block_split,
                                                            BLOCK_SPLITS),
                                     ("valleys", valleys, VALLEY_MODES)):
            if value not in choices:
                raise ValueError(f"Invalid {name}={value!r}. Must be one of "
                                 f"{', '.join(repr(c) for c in choices)}.")
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize={maximize!r}. Must be True or False.")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused={fused!r}. Must be None, True or False.")
        if strict not in (True, False):
            raise ValueError(f"Invalid strict={strict!r}. Must be True or False.")
        input_shape = check_input_shape(input_shape)
        model = self._unwrap(model)      # torch.compile, DataParallel, DDP share the parameters
        # every parameter, as torch.optim.SGD(model.parameters()) takes them: one frozen now
        # and unfrozen later then gets its plain SGD step (it is outside every chain block)
        params = list(model.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError("GSGD got a model with no trainable parameters")
        self._structure = dict(skeleton_init=skeleton_init, bn=bn, block_split=block_split,
                               valleys=valleys, input_shape=input_shape)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      bpr=bpr, min_pivot_ratio=min_pivot_ratio,
                                      maximize=maximize, **self._structure))
        plan = plan_blocks(model, bn=bn, block_split=block_split, valleys=valleys,
                           input_shape=input_shape)
        if plan.frozen_blocks:
            warnings.warn("GSGD leaves chain block(s) with frozen layers to plain SGD (a step "
                          "would have to rescale the frozen weights): "
                          + "; ".join(" -> ".join(b.names) for b in plan.frozen_blocks),
                          GSGDWarning, stacklevel=2)
        position = {id(p): k for k, p in enumerate(params)}
        names = {id(p): name for name, p in model.named_parameters()}
        self._param_names = [names.get(id(p), "?") for p in params]
        self.fused = fused
        self.strict = strict
        self._blocks = [BlockRecord(block.layout(), [position[id(m.weight)] for m in block.modules],
                                     [position[id(m.bias)] if m.bias is not None else None
                                      for m in block.modules]) for block in plan.blocks]
        self._demoted: list[int] = []     # blocks left to plain SGD after construction
        self._coverage: Coverage = plan.coverage
        self._activate()
        coverage = plan.coverage
        if not self._plans and not plan.frozen_blocks:
            warnings.warn(f"GSGD found no chain block (Linear/Conv2d layers joined by ReLU) to "
                          f"step in G-space in {type(model).__name__}; every parameter takes a "
                          f"plain SGD step: {coverage_reasons(coverage)}. opt.describe() "
                          "lists them all",
                          GSGDWarning, stacklevel=2)
        elif coverage.in_blocks < coverage.total:
            warnings.warn(coverage_summary(coverage), GSGDWarning, stacklevel=2)
        for note in coverage.valleys:
            warnings.warn(f"GSGD: {note}", GSGDWarning, stacklevel=2)
        with torch.no_grad():
            set_to_one = sum(self._init_skeleton(plan) for plan in self._plans)
        if set_to_one:
            warnings.warn(f"GSGD set {set_to_one} skeleton weights to 1 (skeleton_init='one', "
                          "the paper's initialisation): the network computes a different "
                          "function now. To keep a loaded or pretrained model's weights pass "
                          "skeleton_init='keep', or build GSGD before loading the checkpoint",
                          GSGDWarning, stacklevel=2)
        for problem in step_range_problems(self._plans, self._structure["skeleton_init"]):
            warnings.warn(problem, GSGDWarning, stacklevel=2)

    # -- blocks -------------------------------------------------------------------------------
    def _activate(self) -> None:
        """Plans for the blocks that are not demoted; the rest of the parameters take SGD."""
        params = self.param_groups[0]["params"]
        self._plans = [self._plan(k, record, params)
                       for k, record in enumerate(self._blocks) if k not in self._demoted]
        in_blocks = {id(p) for plan in self._plans for p in plan.params}
        self._outside = [p for p in params if id(p) not in in_blocks]
        self._block_params = [p for plan in self._plans for p in plan.params]
        self._step_record: StepRecord | None = None    # laid out for these plans
        self._native: FusedCPUStep | None = None

    def _plan(self, number: int, record: BlockRecord, params: list[nn.Parameter]) -> BlockPlan:
        block = record.layout
        views = block.views
        skeleton = build_skeleton(block.widths, tuple(v.kernel for v in views),
                                  tuple(v.centre for v in views))
        weights = [params[k] for k in record.weights]
        biases = [params[k] if k is not None else None for k in record.biases]
        return BlockPlan(block, skeleton, weights, biases, {},
                          self._structure["bn"] == "approx_per_tap", number=number)

    def _init_skeleton(self, plan: BlockPlan) -> int:
        """Apply `skeleton_init` to one block (see `gspace.skeleton_init`)."""
        weights = [w.data if w.is_contiguous() else w.data.contiguous() for w in plan.weights]
        changed = init_skeleton(self._structure["skeleton_init"], plan.block.names,
                                plan.skeleton, weights,
                                [b.data if b is not None else None for b in plan.biases],
                                plan.block.bn_approx)
        plan.write_back(weights)
        return changed

    def describe(self) -> str:
        """The full coverage table: every chain block (widths, pivot layer, m, H), every
        parameter that takes plain SGD with the reason, and notes on where chains end."""
        return format_coverage(self._coverage, tuple(k + 1 for k in self._demoted))

    @property
    def blocks(self) -> list[BlockLayout]:
        """The chain blocks that take G-SGD steps (names, widths, batch-norm flags)."""
        return [plan.block for plan in self._plans]

    # -- per-step checks (called at the top of step()) ---------------------------------------
    def _check_group(self, group: dict) -> None:
        """Refuse param-group keys that the step would ignore (e.g. SGD's nesterov)."""
        check_group_keys("GSGD", group, STEP_KEYS, SGD_NEUTRAL, self._structure)

    def _leave_frozen_blocks_to_sgd(self) -> None:
        """A layer frozen after construction (requires_grad=False): its block takes plain SGD
        from now on, as for a layer frozen before construction (a G-SGD step would rescale
        the frozen weights). Its G-space momentum buffers are dropped."""
        if all(p.requires_grad for p in self._block_params):
            return
        frozen = [plan for plan in self._plans if not all(p.requires_grad for p in plan.params)]
        for plan in frozen:
            for p in plan.params:
                self.state.pop(p, None)      # v-space buffers mean nothing to SGD
        self.check_steps()                   # a pending failure refers to the current plans
        self._demoted = sorted({*self._demoted, *(plan.number for plan in frozen)})
        self._activate()
        warnings.warn("GSGD leaves chain block(s) with layers frozen after construction to "
                      "plain SGD from now on (a step would have to rescale the frozen weights; "
                      "their G-space momentum is dropped): "
                      + "; ".join(" -> ".join(plan.block.names) for plan in frozen),
                      GSGDWarning, stacklevel=3)

    # -- torch.optim.Optimizer plumbing -------------------------------------------------------
    def __repr__(self) -> str:
        text = super().__repr__()       # the param group's options, then ")"
        return text[:-1] + f"    fused: {self.fused}\n    strict: {self.strict}\n)"

    def _record_size(self) -> int:
        return diag_size([len(plan.weights) for plan in self._plans], len(self._outside))

    def _record(self) -> dict:
        """The structure: options, blocks found at construction, blocks demoted since."""
        return {"options": dict(self._structure),
                "blocks": [record.record() for record in self._blocks],
                "demoted": list(self._demoted)}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_gsgd_structure"] = {**self._record(), "coverage": self._coverage,
                                    "fused": self.fused, "strict": self.strict,
                                    "param_names": list(self._param_names)}
        return state

    def __setstate__(self, state: dict) -> None:
        structure = state.pop("_gsgd_structure", None)
        super().__setstate__(state)
        if structure is not None:            # a copy: deepcopy, pickle, torch.save(opt)
            self._structure = dict(structure["options"])
            self._blocks = [BlockRecord.from_record(b) for b in structure["blocks"]]
            self._demoted = list(structure["demoted"])
            self._coverage = structure["coverage"]
            self.fused = structure["fused"]
            self.strict = structure["strict"]
            self._param_names = list(structure["param_names"])
        for group in self.param_groups:
            for key, default in (("min_pivot_ratio", 1e-6), ("momentum", 0.0),
                                 ("weight_decay", 0.0), ("bpr", 0.0), ("maximize", False),
                                 *self._structure.items()):
                group.setdefault(key, default)
        if structure is not None:
            self._activate()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by `state_dict()`; refuses one saved under other structural
        options or another block layout (naming the difference), and one from another
        optimizer (its buffers would mean something else here)."""
        record = state_dict.get(STATE_RECORD)
        if record is None:
            groups = state_dict.get("param_groups") or [{}]
            if not {"bpr", "min_pivot_ratio"} <= set(groups[0]):
                raise ValueError("this state_dict was not saved by GSGD (it has no G-SGD "
                                 "structure record); GSGD cannot use another optimizer's "
                                 "state: start GSGD afresh instead of loading it")
            warnings.warn("this GSGD state_dict has no structure record (saved by an older "
                          "version): its block layout cannot be checked", GSGDWarning,
                          stacklevel=2)
        else:
            check_record(self._structure, self._blocks, record)
        super().load_state_dict(self._without_record(state_dict))
        if record is not None and list(record["demoted"]) != self._demoted:
            self._demoted = list(record["demoted"])
            self._activate()

    @torch.no_grad()
    def step(self, closure=None):
        """One G-SGD step: plan every block (nothing written), check them all on the device,
        apply (the writes gated by the check). Never waits for the device unless `strict`."""
        loss = self._run_closure(closure)
        group = self.param_groups[0]
        self._check_group(group)
        record = self._record_on(group["params"][0].device)
        if record.visible_failure():
            raise self._step_error()
        self._leave_frozen_blocks_to_sgd()
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
