"""`GSpaceOptimizer`: the chain-block plumbing shared by the optimizers that step a model's
chain blocks in G-space (GSGD, GAdam, GRMSprop) and the rest of its parameters by a
weight-space rule.

Written once here: the structural options (`skeleton_init`, `bn`, `block_split`, `valleys`,
`input_shape`) and their checks; the blocks found by `gspace.coverage.plan_blocks` and what
the optimizer says about them (`GSGDWarning`s: coverage, frozen blocks, width valleys, the
skeleton initialisation, the dtype's range); the per-block `BlockPlan`s; a layer frozen after
construction sending its block to the outside rule; `describe()`; copies (`deepcopy`,
`pickle`) rebuilding the blocks from the structure record; `load_state_dict` refusing a state
saved under another structure. A subclass sets `outside_rule` (the name of the step taken
outside the blocks, for messages) and provides the step (`ModelOptimizer`'s contract)."""
from __future__ import annotations

import warnings
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..gspace.blocks import BlockLayout
from ..gspace.coverage import (BLOCK_SPLITS, VALLEY_MODES, Coverage, coverage_reasons,
                               coverage_summary, format_coverage, plan_blocks)
from ..gspace.skeleton import build_skeleton
from ..gspace.skeleton_init import SKELETON_INITS, init_skeleton
from .base import ModelOptimizer, why_not_in_gspace
from .errors import GSGDWarning
from .gsgd_blocks import (BlockPlan, BlockRecord, check_record, left_to_sgd_messages,
                          step_range_problems)
from .validation import check_input_shape

__all__ = ["GSpaceOptimizer", "BN_OPTIONS"]

BN_OPTIONS = ("approx", "approx_per_tap", "split")


class GSpaceOptimizer(ModelOptimizer):
    """Base of the G-space optimizers (see the module doc)."""

    outside_rule: ClassVar[str]          # e.g. "plain SGD": the step outside the blocks
    state_name: ClassVar[str]            # e.g. "G-space momentum": the state a block keeps
    _copied: ClassVar[tuple[str, ...]] = ("strict",)   # attributes a copy carries over
    _norms: dict = {}              # block -> its batch norms (copies hold no modules: none)

    @classmethod
    def _check_model_argument(cls, model) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{cls.name} takes the model (an nn.Module), got "
                            f"{type(model).__name__}; write {cls.name}(model, lr) rather than "
                            f"{cls.name}(model.parameters(), lr)")

    def _setup(self, model: nn.Module, defaults: dict, *, skeleton_init: str, bn: str,
               block_split: str, valleys: str, input_shape: Sequence[int] | None,
               strict: bool) -> None:
        """Find the blocks of `model` and make the one param group (`defaults` + the
        structural options); warn as the module doc says. Called by a subclass's __init__
        after it has checked its own options."""
        if skeleton_init not in SKELETON_INITS:
            raise ValueError(f"Invalid skeleton_init={skeleton_init!r}. Must be one of "
                             f"{', '.join(repr(s) for s in SKELETON_INITS)}.")
        for name, value, choices in (("bn", bn, BN_OPTIONS), ("block_split", block_split,
                                                            BLOCK_SPLITS),
                                     ("valleys", valleys, VALLEY_MODES)):
            if value not in choices:
                raise ValueError(f"Invalid {name}={value!r}. Must be one of "
                                 f"{', '.join(repr(c) for c in choices)}.")
        if not isinstance(defaults.get("maximize"), bool):
            raise ValueError(f"Invalid maximize={defaults.get('maximize')!r}. Must be True "
                             "or False.")
        if strict not in (True, False):
            raise ValueError(f"Invalid strict={strict!r}. Must be True or False.")
        input_shape = check_input_shape(input_shape)
        model = self._unwrap(model)      # torch.compile, DataParallel, DDP share the parameters
        # every parameter, as torch.optim.SGD(model.parameters()) takes them: one frozen now
        # and unfrozen later then gets its outside step (it is outside every chain block)
        params = list(model.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError(f"{self.name} got a model with no trainable parameters")
        self._structure = dict(skeleton_init=skeleton_init, bn=bn, block_split=block_split,
                               valleys=valleys, input_shape=input_shape)
        super().__init__(params, {**defaults, **self._structure})
        plan = plan_blocks(model, bn=bn, block_split=block_split, valleys=valleys,
                           input_shape=input_shape)
        owner, rule = self.name, self.outside_rule
        if plan.frozen_blocks:
            warnings.warn(f"{owner} leaves chain block(s) with frozen layers to {rule} (a step "
                          "would have to rescale the frozen weights): "
                          + "; ".join(" -> ".join(b.names) for b in plan.frozen_blocks),
                          GSGDWarning, stacklevel=3)
        position = {id(p): k for k, p in enumerate(params)}
        names = {id(p): name for name, p in model.named_parameters()}
        self._param_names = [names.get(id(p), "?") for p in params]
        self.strict = strict
        self._blocks = [BlockRecord(block.layout(), [position[id(m.weight)] for m in block.modules],
                                     [position[id(m.bias)] if m.bias is not None else None
                                      for m in block.modules]) for block in plan.blocks]
        self._norms = {k: [n for ns in b.norms for n in ns] for k, b in enumerate(plan.blocks)}
        self._demoted: list[int] = []     # blocks left to the outside rule after construction
        self._coverage: Coverage = plan.coverage
        self._activate()
        coverage = plan.coverage
        if not self._plans and not plan.frozen_blocks:
            warnings.warn(f"{owner} found no chain block (Linear/Conv2d layers joined by ReLU) "
                          f"to step in G-space in {type(model).__name__}; every parameter "
                          f"takes a {rule} step: {coverage_reasons(coverage)}. opt.describe() "
                          "lists them all",
                          GSGDWarning, stacklevel=3)
        elif coverage.in_blocks < coverage.total or coverage.approximate:
            warnings.warn(coverage_summary(coverage, owner, rule), GSGDWarning, stacklevel=3)
        for note in coverage.valleys:
            warnings.warn(f"{owner}: {note}", GSGDWarning, stacklevel=3)
        with torch.no_grad():
            set_to_one = sum(self._init_skeleton(plan) for plan in self._plans)
        if set_to_one:
            warnings.warn(f"{owner} set {set_to_one} skeleton weights to 1 (skeleton_init="
                          "'one', the paper's initialisation): the network computes a "
                          "different function now. To keep a loaded or pretrained model's "
                          f"weights pass skeleton_init='keep', or build {owner} before loading "
                          "the checkpoint", GSGDWarning, stacklevel=3)
        for problem in step_range_problems(self._plans, self._structure["skeleton_init"],
                                           owner):
            warnings.warn(problem, GSGDWarning, stacklevel=3)

    # -- blocks -------------------------------------------------------------------------------
    def _activate(self) -> None:
        """Plans for the blocks that are not demoted; the rest of the parameters take the
        outside rule."""
        params = self.param_groups[0]["params"]
        self._plans = [self._plan(k, record, params)
                       for k, record in enumerate(self._blocks) if k not in self._demoted]
        in_blocks = {id(p) for plan in self._plans for p in plan.params}
        self._outside = [p for p in params if id(p) not in in_blocks]
        self._block_params = [p for plan in self._plans for p in plan.params]
        self._step_record = None      # laid out for these plans
        self._native = None           # a fused kernel's description of these plans

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
        parameter that takes the outside step with the reason, and notes on where chains
        end."""
        return format_coverage(self._coverage, tuple(k + 1 for k in self._demoted), self.name,
                               self.outside_rule)

    @property
    def blocks(self) -> list[BlockLayout]:
        """The chain blocks that take G-space steps (names, widths, batch-norm flags)."""
        return [plan.block for plan in self._plans]

    def _leave_blocks_outside(self) -> None:
        """A block that cannot take a G-space step now (`base.why_not_in_gspace`: a layer
        frozen after construction, parameters without a gradient, batch norm in eval mode)
        takes the outside rule from now on; its G-space state is dropped."""
        reasons = {plan.number: why_not_in_gspace(plan.params, self._norms.get(plan.number, ()))
                   for plan in self._plans}
        left = [plan for plan in self._plans if reasons[plan.number]]
        if not left:
            return
        for plan in left:
            for p in plan.params:
                self.state.pop(p, None)      # v-space state means nothing outside G-space
        self.check_steps()                   # a pending failure refers to the current plans
        self._demoted = sorted({*self._demoted, *(plan.number for plan in left)})
        self._activate()
        names = dict(zip(map(id, self.param_groups[0]["params"]), self._param_names))
        for message in left_to_sgd_messages(left, reasons, names, self.name,
                                            self.outside_rule, self.state_name):
            warnings.warn(message, GSGDWarning, stacklevel=3)

    # -- torch.optim.Optimizer plumbing -------------------------------------------------------
    def __repr__(self) -> str:
        text = super().__repr__()       # the param group's options, then ")"
        extra = "".join(f"    {key}: {getattr(self, key)}\n" for key in self._copied)
        return text[:-1] + extra + ")"

    def _record(self) -> dict:
        """The structure: options, blocks found at construction, blocks demoted since."""
        return {"options": dict(self._structure),
                "blocks": [record.record() for record in self._blocks],
                "demoted": list(self._demoted)}

    def _group_defaults(self) -> dict:
        """Keys a param group of an older version may lack, with their defaults."""
        return {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_gsgd_structure"] = {**self._record(), "coverage": self._coverage,
                                    "param_names": list(self._param_names),
                                    **{key: getattr(self, key) for key in self._copied}}
        return state

    def __setstate__(self, state: dict) -> None:
        structure = state.pop("_gsgd_structure", None)
        super().__setstate__(state)
        if structure is not None:            # a copy: deepcopy, pickle, torch.save(opt)
            self._structure = dict(structure["options"])
            self._blocks = [BlockRecord.from_record(b) for b in structure["blocks"]]
            self._demoted = list(structure["demoted"])
            self._coverage = structure["coverage"]
            for key in self._copied:
                setattr(self, key, structure[key])
            self._param_names = list(structure["param_names"])
        for group in self.param_groups:
            for key, default in (*self._group_defaults().items(), *self._structure.items()):
                group.setdefault(key, default)
        if structure is not None:
            self._activate()

    own_keys: ClassVar[frozenset] = frozenset()   # param-group keys only this optimizer has

    def _load_without_record(self, state_dict: dict) -> None:
        """A state_dict without the structure record: accepted with a warning when its param
        group has this optimizer's own keys (torch.distributed.checkpoint keeps only 'state'
        and 'param_groups'), refused otherwise (another optimizer's state)."""
        groups = state_dict.get("param_groups") or [{}]
        if not self.own_keys or not self.own_keys <= set(groups[0]):
            raise ValueError(f"this state_dict was not saved by {self.name} (it has no "
                             f"{self.name} structure record); {self.name} cannot use another "
                             f"optimizer's state: start {self.name} afresh instead of loading "
                             "it")
        warnings.warn(f"this {self.name} state_dict has no structure record (it passed "
                      "through a tool that keeps only 'state' and 'param_groups', e.g. torch."
                      "distributed.checkpoint, or an older version saved it): its block "
                      "layout cannot be checked", GSGDWarning, stacklevel=3)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by `state_dict()`; refuses one saved under other structural
        options or another block layout (naming the difference), and one from another
        optimizer (its state would mean something else here)."""
        record = state_dict.get(self.record_key)
        if record is None:
            self._load_without_record(state_dict)
        else:
            check_record(self._structure, self._blocks, record, self.name)
        super().load_state_dict(self._without_record(state_dict))
        if record is not None and list(record["demoted"]) != self._demoted:
            self._demoted = list(record["demoted"])
            self._activate()
