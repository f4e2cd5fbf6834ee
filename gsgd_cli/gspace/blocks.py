"""Find a model's chain blocks: runs of layers joined only by ReLU, by tracing with torch.fx.

A chain block is a sequence of `nn.Linear` layers `f_0, f_1, ...` where the output of `f_i`
reaches `f_{i+1}` through ReLU (at least one) and operations that commute with a positive
per-feature scale (dropout, identity, flatten of `[batch, features]` activations), and
through nothing else: every intermediate value has exactly one user, so no hidden activation
leaks out (a skip connection reading it would break the invariance). The block's input and
output nodes are not rescaled, so anything may come before its first and after its last layer.

Parameters outside every chain block (a lone Linear, normalisation layers, ...) are listed in
`Discovery.outside` and take a plain SGD step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

_RELU_MODULES = (nn.ReLU,)
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {F.dropout, torch.flatten}
_PASS_METHODS = {"flatten"}


class ModelNotTraceable(ValueError):
    """torch.fx could not trace the model's forward."""


@dataclass
class ChainBlock:
    """Layers of one chain block, in forward order."""

    names: list[str]              # qualified module names, e.g. "net.3"
    modules: list[nn.Module]

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.modules[0].in_features, *[m.out_features for m in self.modules])

    @property
    def num_weights(self) -> int:
        """m: weights and biases of the block."""
        return sum(p.numel() for m in self.modules for p in m.parameters(recurse=False))

    @property
    def num_hidden(self) -> int:
        """H: hidden nodes of the block."""
        return sum(self.widths[1:-1])


@dataclass
class Discovery:
    blocks: list[ChainBlock]
    outside: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # why a layer is not in a block


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types; report them all the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotTraceable(
            f"cannot trace {type(model).__name__} with torch.fx ({first}); G-SGD finds chain "
            "blocks by tracing, so the forward must avoid data-dependent control flow") from exc


def _next_linear(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, str]:
    """Follow the single-user chain from a Linear's output to the next Linear, if any."""
    seen_relu = False
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None, "its output is used more than once" if users else "its output is unused"
        user = users[0]
        if user.op == "call_module" and isinstance(modules[user.target], nn.Linear):
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, "it feeds a Linear in an unexpected way"
            if not seen_relu:
                return None, "it feeds the next Linear without a ReLU in between"
            return user, ""
        if _is_relu(user, modules):
            seen_relu = True
        elif not _is_pass_through(user, modules):
            what = user.target if user.op != "call_module" else type(modules[user.target]).__name__
            return None, f"it is followed by {getattr(what, '__name__', what)}"
        # the activation must be the first argument, and no other tensor may flow in
        if user.args[0] is not current or any(isinstance(a, fx.Node) for a in user.args[1:]):
            return None, "an activation is combined with another tensor"
        current = user


def find_chain_blocks(model: nn.Module) -> Discovery:
    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    linear_nodes = [n for n in graph_module.graph.nodes
                    if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
    calls: dict[str, int] = {}
    for n in linear_nodes:
        calls[n.target] = calls.get(n.target, 0) + 1
    notes: list[str] = []
    successor: dict[fx.Node, fx.Node] = {}
    for n in linear_nodes:
        if calls[n.target] > 1:
            notes.append(f"{n.target}: called {calls[n.target]} times in forward")
            continue
        nxt, why = _next_linear(n, modules)
        if nxt is not None and calls[nxt.target] == 1:
            successor[n] = nxt
        elif why and why != "its output is unused":
            notes.append(f"{n.target}: not joined to a next layer ({why})")
    has_predecessor = set(successor.values())
    blocks = []
    for n in linear_nodes:
        if n in successor and n not in has_predecessor:
            chain = [n]
            while chain[-1] in successor:
                chain.append(successor[chain[-1]])
            blocks.append(ChainBlock([c.target for c in chain], [modules[c.target] for c in chain]))

    in_block_names = {name for b in blocks for name in b.names}
    notes = [note for note in notes if note.split(":")[0] not in in_block_names]
    in_block = {id(p) for b in blocks for m in b.modules for p in m.parameters()}
    owners: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared = [name for b in blocks for name, m in zip(b.names, b.modules)
              if any(owners[id(p)] > 1 for p in m.parameters())]
    if shared:
        raise ValueError(f"layer(s) {', '.join(shared)} share parameters with other modules; "
                         "G-SGD needs each chain-block weight to belong to one layer")
    outside = [(name, p) for name, p in model.named_parameters() if id(p) not in in_block]
    return Discovery(blocks, outside, notes)
