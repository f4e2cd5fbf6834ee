"""A G-SGD block at run time: `BlockRecord` (what construction found: layout and parameter
positions, plain data for copies and checkpoints) and `BlockPlan` (its parameters, skeleton,
per-device index and workspace; `tensors()` gathers what the step functions take)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..gspace.batchnorm import scale_grads_for_bn
from ..gspace.conditioning import step_range
from ..gspace.blocks import BlockLayout
from ..gspace.skeleton import ChainSkeleton
from ..gspace.update import ChainIndex, Workspace

__all__ = ["BlockRecord", "BlockPlan", "momentum_buffer", "check_record", "step_range_problems",
           "left_to_sgd_messages"]


@dataclass
class BlockRecord:
    """A block as found at construction: its layout and its parameters' positions in the
    param group (`None`: no bias). Plain data, so copies and checkpoints can carry it."""

    layout: BlockLayout
    weights: list[int]
    biases: list[int | None]

    def record(self) -> dict:
        return {**self.layout.record(), "weights": list(self.weights),
                "biases": [-1 if b is None else b for b in self.biases]}

    @classmethod
    def from_record(cls, record: dict) -> "BlockRecord":
        return cls(BlockLayout.from_record(record), list(record["weights"]),
                   [None if b < 0 else b for b in record["biases"]])


@dataclass
class BlockPlan:
    block: BlockLayout
    skeleton: ChainSkeleton
    weights: list[nn.Parameter]
    biases: list[nn.Parameter | None]
    indices: dict[torch.device, ChainIndex]
    per_tap: bool = False      # bn="approx_per_tap": the published code's norm
    workspace: Workspace = field(default_factory=Workspace)
    number: int = 0            # position among the blocks found at construction

    @property
    def params(self) -> list[nn.Parameter]:
        return [*self.weights, *[b for b in self.biases if b is not None]]

    def index_on(self, device: torch.device) -> ChainIndex:
        if device not in self.indices:
            self.indices[device] = ChainIndex.build(self.skeleton, device)
        return self.indices[device]

    def tensors(self, maximize: bool = False):
        """(weights, biases, grads, bias grads), detached, in layer order.

        For a layer followed by batch norm (bn="approx") the weight gradient is multiplied,
        per output channel, by the norm of that channel's incoming filter (paper, eq. 39);
        with `per_tap` by the norm over input channels at each kernel position instead.
        `maximize`: the gradients of -loss (new tensors; `.grad` is not changed)."""
        weights = [w.detach() if w.is_contiguous() else w.detach().contiguous()
                   for w in self.weights]      # e.g. channels_last: see write_back
        grads = [w.grad for w in self.weights]
        bias_grads = [b.grad if b is not None else None for b in self.biases]
        if maximize:
            grads = [-g if g is not None else None for g in grads]
            bias_grads = [-g if g is not None else None for g in bias_grads]
        scale_grads_for_bn(weights, grads, self.block.bn_after, self.per_tap)
        return (weights, [b.detach() if b is not None else None for b in self.biases],
                grads, bias_grads)

    def write_back(self, weights: list[Tensor]) -> None:
        """Copy the stepped contiguous copies (`tensors()`) into non-contiguous weights."""
        for w, stepped in zip(self.weights, weights):
            if stepped.data_ptr() != w.data_ptr():
                w.detach().copy_(stepped)


def momentum_buffer(state, param: Tensor) -> Tensor:
    """`state[param]["momentum_buffer"]`, created as zeros (contiguous) on first use."""
    state = state[param]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return state["momentum_buffer"]


def check_record(options: dict, blocks: list[BlockRecord], record: dict,
                 owner: str = "GSGD") -> None:
    """Refuse a saved structure record of other options or another block layout (one
    ValueError naming the option or the first differing block; `owner`: the optimizer)."""
    for key, mine in options.items():
        saved = record["options"].get(key)
        if saved != mine:
            raise ValueError(f"the state_dict was saved by {owner} with {key}={saved!r}, this "
                             f"{owner} has {key}={mine!r}: build it with {key}={saved!r} to "
                             "load this state")
    mine = [b.record() for b in blocks]
    saved = list(record["blocks"])
    for k in range(max(len(mine), len(saved))):
        a = saved[k] if k < len(saved) else None
        b = mine[k] if k < len(mine) else None
        if a != b:
            def show(r):
                return "none" if r is None else " -> ".join(r["names"])
            raise ValueError(f"the state_dict's G-space blocks differ from this {owner}'s: "
                             f"block {k + 1} is {show(a)} there and {show(b)} here (or its "
                             f"widths or parameters differ); load it into a {owner} built on "
                             "the same model with the same options")


def step_range_problems(plans: list[BlockPlan], skeleton_init: str,
                        owner: str = "GSGD") -> list[str]:
    """A warning for each block whose steps the parameters' dtype cannot represent
    (`gspace.conditioning`)."""
    problems = []
    for plan in plans:
        weights = plan.weights
        if weights[0].device.type == "meta":      # no values to check
            continue
        found = step_range(plan.skeleton, plan.index_on(weights[0].device),
                           weights).problem(weights[0].dtype)
        if found:
            names = plan.block.names
            where = (f"{names[0]} -> ... -> {names[-1]} ({len(names)} layers)"
                     if len(names) > 3 else " -> ".join(names))
            advice = ("skeleton_init='one' keeps the products near 1" if
                      skeleton_init != "one" else
                      "shorter blocks (block_split='stage') or float64 keep them in range")
            problems.append(f"{owner}: in chain block {where} the products s of skeleton "
                            f"weights along the chains make a step impossible: {found}; "
                            f"{advice} (README, Known limits)")
    return problems


def left_to_sgd_messages(left: list[BlockPlan], reasons: dict[int, str],
                         names: dict[int, str], owner: str = "GSGD",
                         rule: str = "plain SGD", state: str = "G-space momentum") -> list[str]:
    """The warnings for blocks left to the outside rule (`rule`) at a step (`reasons`: block number ->
    `base.why_not_in_gspace`; `names`: id(parameter) -> name)."""
    frozen = [plan for plan in left if reasons[plan.number] == "frozen"]
    no_grad = [plan for plan in left if reasons[plan.number] == "no gradient"]
    messages = []
    if frozen:
        messages.append(f"{owner} leaves chain block(s) with layers frozen after construction to "
                        f"{rule} from now on (a step would have to rescale the frozen "
                        f"weights; their {state} is dropped): "
                        + "; ".join(" -> ".join(plan.block.names) for plan in frozen))
    if no_grad:
        messages.append(f"{owner} leaves chain block(s) in which some parameters have no gradient "
                        f"(.grad is None) to {rule} from now on: a G-space step would move "
                        f"them (torch.optim leaves them unchanged, and so does the {rule} "
                        f"step); their {state} is dropped: "
                        + "; ".join(" -> ".join(plan.block.names) + " (no gradient: "
                                    + ", ".join(names.get(id(p), "?") for p in plan.params
                                                if p.grad is None) + ")"
                                    for plan in no_grad))
    in_eval = [plan for plan in left if reasons[plan.number] == "batch norm in eval mode"]
    if in_eval:
        messages.append(f"{owner} leaves chain block(s) through batch norm in eval mode (running "
                        "statistics: an affine map with an offset, not even approximately "
                        f"scale-invariant) to {rule} from now on; their {state} is "
                        "dropped: " + "; ".join(" -> ".join(plan.block.names)
                                                for plan in in_eval))
    return messages
