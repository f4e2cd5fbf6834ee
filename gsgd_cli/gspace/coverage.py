"""Which parameters G-SGD steps in G-space, which take plain SGD, and why.

`plan_blocks(model, ...)` turns the chain blocks found by `find_chain_blocks` into the blocks
G-SGD steps: split per stage (`block_split="stage"`), split at width valleys
(`valleys="split"`) or refused (`valleys="refuse"`), blocks with frozen layers left out. Its
`Coverage` is plain data (picklable) with one row per parameter; `format_coverage` prints it
(`GSGD.describe()`, `gsgd inspect`) and `coverage_summary` is the one-line note GSGD gives
at construction.

Width valleys: the skeleton construction (`skeleton.py`) needs the hidden widths of a block to
rise and then fall. At a hidden layer narrower than layers on both sides the block is split in
two, the valley's nodes becoming the output of the first part and the input of the second.
Each part is an exact G-SGD block, but the valley's nodes are then held like a block's
inputs and outputs: G-SGD is invariant to rescaling every hidden node except those.
A part of a single layer takes plain SGD.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from torch import nn

from ..graph.ops import NORM_OPS, Op, module_op
from .blocks import ChainBlock, find_chain_blocks
from .skeleton import UnsupportedWidthProfile, check_single_peak, pivot_layer_of

BLOCK_SPLITS = ("none", "stage")
VALLEY_MODES = ("split", "refuse")


@dataclass
class Row:
    """One parameter: where it is stepped (`block`: 1-based block number, or None: plain SGD)
    and why it is outside every block."""

    name: str
    shape: tuple[int, ...]
    numel: int
    block: int | None
    why: str = ""


@dataclass
class BlockSummary:
    names: list[str]
    widths: tuple[int, ...]
    bn_layers: list[str]
    num_weights: int
    num_hidden: int


@dataclass
class Coverage:
    model: str                                  # the model's class name
    rows: list[Row]                             # trainable parameters
    blocks: list[BlockSummary]
    frozen: list[str] = field(default_factory=list)   # parameters that are not trained
    notes: list[str] = field(default_factory=list)    # where chains end, and why
    valleys: list[str] = field(default_factory=list)  # blocks split at a width valley

    @property
    def total(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def in_blocks(self) -> int:
        return sum(r.numel for r in self.rows if r.block is not None)

    @property
    def approximate(self) -> int:
        """Parameters in blocks through batch norm: the paper's eq. 39 approximation, not an
        exact G-space step (blocks without batch norm are exact)."""
        approx = {k for k, b in enumerate(self.blocks, 1) if b.bn_layers}
        return sum(r.numel for r in self.rows if r.block in approx)

    @property
    def exact(self) -> int:
        return self.in_blocks - self.approximate


@dataclass
class Plan:
    blocks: list[ChainBlock]            # the blocks G-SGD steps
    frozen_blocks: list[ChainBlock]     # left to SGD because a layer is frozen
    coverage: Coverage


def split_by_stage(block: ChainBlock) -> list[ChainBlock]:
    """One block per stage: maximal runs of >= 2 consecutive layers that keep the width.

    Width-changing layers (stem, stride-2 transitions, classifier) fall outside and take
    plain SGD, as in the published code's per-stage blocks."""
    parts, run = [], []
    for k, view in enumerate(block.views + [None]):
        if view is not None and view.n_in == view.n_out:
            run.append(k)
            continue
        if len(run) >= 2:
            parts.append(_part(block, run[0], run[-1] + 1))
        run = []
    return parts


def _part(block: ChainBlock, start: int, stop: int) -> ChainBlock:
    return ChainBlock(block.names[start:stop], block.modules[start:stop],
                      block.bn_after[start:stop], block.norms[start:stop])


def valley_message(block: ChainBlock, exc: UnsupportedWidthProfile) -> str:
    k, widths = exc.hidden_layer, block.widths
    return (f"chain block {' -> '.join(block.names)}: the output of '{block.names[k - 1]}' "
            f"(hidden layer {k}, width {widths[k]}) is narrower than hidden layers on both "
            f"sides (widths [{':'.join(map(str, widths))}]), a width valley")


def split_at_valleys(block: ChainBlock, notes: list[str]) -> list[ChainBlock]:
    """Split a block at its width valleys (see the module docstring); parts of >= 2 layers."""
    try:
        check_single_peak(block.widths)
        return [block]
    except UnsupportedWidthProfile as exc:
        k = exc.hidden_layer          # the valley is the output of layer k - 1
        notes.append(f"{valley_message(block, exc)}: split there (valleys='split'); the "
                     "valley's nodes are held like a block's inputs and outputs")
        first, rest = _part(block, 0, k), _part(block, k, len(block.names))
        return ([first] if len(first.names) >= 2 else []) + (
            split_at_valleys(rest, notes) if len(rest.names) >= 2 else [])


def _frozen(block: ChainBlock) -> bool:
    return any(not p.requires_grad for m in block.modules for p in m.parameters(recurse=False))


def plan_blocks(model: nn.Module, *, bn: str = "approx", block_split: str = "none",
                valleys: str = "split",
                input_shape: tuple[int, ...] | None = None) -> Plan:
    """The blocks G-SGD steps on `model`, and the coverage of its parameters."""
    for name, value, choices in (("bn", bn, ("approx", "approx_per_tap", "split")),
                                 ("block_split", block_split, BLOCK_SPLITS),
                                 ("valleys", valleys, VALLEY_MODES)):
        if value not in choices:
            raise ValueError(f"Invalid {name}={value!r}. Must be one of "
                             f"{', '.join(repr(c) for c in choices)}.")
    discovery = find_chain_blocks(model, bn="split" if bn == "split" else "approx",
                                  input_shape=input_shape)
    notes: list[str] = []
    left_out: dict[str, str] = {}       # layer -> why a split left it alone

    def split(blocks, how, why):
        parts = []
        for block in blocks:
            pieces = how(block)
            kept = {n for piece in pieces for n in piece.names}
            left_out.update({n: why for n in block.names if n not in kept})
            parts += pieces
        return parts

    blocks = discovery.blocks
    if block_split == "stage":
        blocks = split(blocks, split_by_stage,
                       "block_split='stage': not in a run of >= 2 equal-width layers")
    if valleys == "refuse":
        for block in blocks:
            try:
                check_single_peak(block.widths)
            except UnsupportedWidthProfile as exc:
                raise UnsupportedWidthProfile(
                    f"G-SGD cannot handle {valley_message(block, exc)}. With valleys='refuse' "
                    "the hidden widths of a block must rise and then fall (a single peak); "
                    "valleys='split' splits the block there instead", exc.hidden_layer) from None
    else:
        blocks = split(blocks, lambda b: split_at_valleys(b, notes),
                       "alone after its chain block was split at a width valley")
    frozen = [b for b in blocks if _frozen(b)]
    left_out.update({n: "its chain block has a frozen layer" for b in frozen for n in b.names})
    blocks = [b for b in blocks if not _frozen(b)]
    coverage = _coverage(model, blocks, left_out, discovery.notes, notes)
    return Plan(blocks, frozen, coverage)


def _owner_reasons(model: nn.Module, notes: list[str]) -> dict[str, str]:
    """Why each module's parameters are outside: from the discovery notes or the module type."""
    by_layer: dict[str, list[str]] = collections.defaultdict(list)
    for note in notes:
        name, _, why = note.partition(": ")
        for prefix, label in (("not joined to a next layer (", "chain ends here: "),
                              ("not a chain layer (", "not a chain layer: ")):
            if why.startswith(prefix) and why.endswith(")"):
                why = label + why[len(prefix):-1]
        by_layer[name].append(why)
    reasons = {}
    modules = dict(model.named_modules())
    for name, module in model.named_modules():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if name in by_layer:
            reasons[name] = "; ".join(by_layer[name])
        elif module_op(module) in NORM_OPS:
            reasons[name] = f"{type(module).__name__}'s own parameter (not in G-space)"
        elif module_op(module) is Op.HOMOGENEOUS:
            reasons[name] = (f"{type(module).__name__}'s slope (an activation's parameter, "
                             "not in G-space; unchanged by the rescaling)")
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and parent is not None and not (
                isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict))) and type(
                parent).__module__.startswith("torch.nn"):
            reasons[name] = (f"its weight is read inside {type(parent).__name__}'s own forward "
                             "(not called as a layer; G-SGD does not look into it)")
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            reasons[name] = ("not joined to another Linear/Conv2d by ReLU and operations G-SGD "
                             "follows (opt.describe() says where each chain ends)")
        elif any(True for _ in module.children()):
            reasons[name] = (f"registered directly on {type(module).__name__}, which has "
                             "submodules, and used in its forward outside any chain layer")
        else:
            reasons[name] = (f"{type(module).__name__} is not a chain layer (G-SGD handles "
                             "nn.Linear and nn.Conv2d)")
    return reasons


def _coverage(model, blocks, left_out, discovery_notes, notes) -> Coverage:
    where = {id(p): k for k, b in enumerate(blocks, 1) for p in b.gspace_params()}
    reasons = {**_owner_reasons(model, discovery_notes), **left_out}
    reasons.update({name: (f"registered on chain layer '{name}' beside its weight and bias "
                           "(not in G-space)") for b in blocks for name in b.names})
    owner = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), name)
    rows, frozen_params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen_params.append(name)
            continue
        module = owner.get(id(p), "")
        why = "" if id(p) in where else reasons.get(module, "not in a chain block")
        rows.append(Row(name, tuple(p.shape), p.numel(), where.get(id(p)), why))
    summaries = [BlockSummary(list(b.names), tuple(b.widths),
                              [n for n, f in zip(b.names, b.bn_after) if f],
                              b.num_weights, b.num_hidden) for b in blocks]
    in_blocks = {n for b in blocks for n in b.names}
    ends = [f"chain ends at {note}" for note in discovery_notes
            if note.partition(":")[0] in in_blocks]
    return Coverage(type(model).__name__, rows, summaries, frozen_params, ends, notes)


def _percent(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "0%"


def _share(coverage: Coverage) -> str:
    """"12.0% exact" / "80.0% approximate (batch norm, eq. 39)" / both, of the total."""
    parts = [f"{_percent(n, coverage.total)} {what}" for n, what in (
        (coverage.exact, "exact"), (coverage.approximate, "approximate (through batch norm: "
                                                          "the paper's eq. 39)")) if n]
    return " and ".join(parts) if parts else "0%"


def coverage_reasons(coverage: Coverage, max_groups: int = 4) -> str:
    """Why parameters take plain SGD, grouped by reason: "'a', 'b' and 3 more (why); ..."."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for row in coverage.rows:
        if row.block is None:
            module = row.name.rsplit(".", 1)[0] if "." in row.name else row.name
            if module not in groups[row.why]:
                groups[row.why].append(module)
    parts = []
    for why, modules in sorted(groups.items(), key=lambda item: -len(item[1]))[:max_groups]:
        shown = ", ".join(f"'{m}'" for m in modules[:2])
        more = f" and {len(modules) - 2} more" if len(modules) > 2 else ""
        parts.append(f"{shown}{more} ({why})")
    if len(groups) > max_groups:
        parts.append(f"{len(groups) - max_groups} more reasons")
    return "; ".join(parts)


def coverage_summary(coverage: Coverage, owner: str = "GSGD",
                     outside: str = "plain SGD") -> str:
    """One line: the share of trainable parameters in G-space and why the rest is outside
    (`owner`: the optimizer's name; `outside`: the step the rest take)."""
    reasons = coverage_reasons(coverage)
    head = (f"{owner}: {_share(coverage)} of the trainable parameters of {coverage.model} "
            f"({coverage.exact} exact, {coverage.approximate} approximate, of "
            f"{coverage.total}) are in {len(coverage.blocks)} G-space chain block(s)")
    if coverage.in_blocks == coverage.total:
        return head + ". opt.describe() lists them all"
    return (head + f"; the rest take {outside}" + (": " + reasons if reasons else "")
            + ". opt.describe() lists them all")


def format_coverage(coverage: Coverage, demoted: tuple[int, ...] = (), owner: str = "GSGD",
                    outside_rule: str = "plain SGD") -> str:
    """The full table: blocks (widths, pivot, m, H), every parameter outside, notes.

    `demoted`: 1-based numbers of blocks left to the outside rule after construction;
    `owner`: the optimizer's name; `outside_rule`: the step taken outside the blocks."""
    lines = []
    for k, block in enumerate(coverage.blocks, 1):
        widths = block.widths
        lines.append(f"chain block {k}: {' -> '.join(block.names)}")
        state = (f" ({outside_rule} since a layer was frozen after construction)"
                 if k in demoted else "")
        lines.append(f"  widths [{':'.join(map(str, widths))}], pivot layer "
                     f"'{block.names[pivot_layer_of(widths)]}'{state}")
        if block.bn_layers:
            lines.append(f"  batch norm after {len(block.bn_layers)} layer(s): APPROXIMATION "
                         "(paper eq. 39: their gradients are scaled by each channel's filter "
                         "norm; the block is not exactly scale-invariant)")
        m, h = block.num_weights, block.num_hidden
        lines.append(f"  m = {m}, H = {h}, m - H = {m - h}, H/m = {h / m:.3e}")
    if not coverage.blocks:
        lines.append(f"no chain block: {owner} takes a {outside_rule} step everywhere")
    else:
        m = sum(b.num_weights for b in coverage.blocks)
        h = sum(b.num_hidden for b in coverage.blocks)
        lines.append(f"total over chain blocks: m = {m}, H = {h}, m - H = {m - h}, "
                     f"H/m = {h / m:.3e}")
    rows = [r if r.block is None or r.block not in demoted
            else Row(r.name, r.shape, r.numel, None, "a layer of its block was frozen after "
                     "construction") for r in coverage.rows]
    outside = [r for r in rows if r.block is None]
    total = coverage.total
    inside = sum(r.numel for r in rows if r.block is not None)
    frozen = (f"; {len(coverage.frozen)} frozen parameter tensor(s) are not trained"
              if coverage.frozen else "")
    approx = {k for k, b in enumerate(coverage.blocks, 1) if b.bn_layers}
    approximate = sum(r.numel for r in rows if r.block is not None and r.block in approx)
    lines.append(f"parameters: {total} in all, {inside} in chain blocks "
                 f"({_percent(inside, total)}: {inside - approximate} exact "
                 f"({_percent(inside - approximate, total)}), {approximate} approximate through "
                 f"batch norm ({_percent(approximate, total)})), {total - inside} outside "
                 f"({outside_rule} step){frozen}")
    for row in outside:
        lines.append(f"  outside: {row.name} {row.shape}: {row.why}")
    for note in coverage.valleys + coverage.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
