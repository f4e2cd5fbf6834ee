"""Find a model's chain blocks: runs of layers joined only by ReLU, by tracing with torch.fx.

A chain block is a sequence of layers `f_0, f_1, ...` (`nn.Linear`, or `nn.Conv2d` with
`groups=1` and zero padding) where the output of `f_i` reaches `f_{i+1}` through ReLU (at
least one) and operations that commute with a positive per-channel scale (dropout, identity,
average and max pooling, zero padding, flatten), and through nothing else: every intermediate
value has exactly one user, so no hidden activation leaks out (a skip connection reading it
would break the invariance). The block's input and output nodes are not rescaled, so anything
may come before its first and after its last layer; in a residual block the shortcut pins
the block's input and output channels and the chain lies inside the block.

A hidden node is a feature of a Linear layer or a channel of a convolution. Every layer is seen
as `[n_out, n_in, K]`: K parallel edges per node pair (the kernel elements of a convolution;
the spatial positions when a Linear layer reads a flattened feature map of `n_in` channels).
The skeleton edge of a node pair is the kernel centre (offset 0 for a Linear layer).

With `bn="approx"`, batch norm between two layers is let through as well and the layer it
follows is flagged: G-SGD then applies the paper's approximation (appendix 11.2) to it, since
batch norm makes each filter scale-invariant by itself and the chain is no longer exactly
invariant. With `bn="split"` batch norm ends a chain.

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
_PASS_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d)
_PASS_FUNCTIONS = {F.dropout, torch.flatten, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d,
                   F.adaptive_max_pool2d}
_PASS_METHODS = {"flatten"}
_FLATTENS = (nn.Flatten,)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
BN_MODES = ("approx", "split")


class ModelNotTraceable(ValueError):
    """torch.fx could not trace the model's forward."""


@dataclass(frozen=True)
class LayerView:
    """A layer seen as `[n_out, n_in, K]`, skeleton edges at kernel offset `centre`."""

    n_out: int
    n_in: int
    kernel: int
    centre: int


def _out_nodes(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros")


@dataclass
class BlockLayout:
    """A chain block as plain data (names, layer views, batch-norm flags, biases): what G-SGD
    needs once the block is found. It holds no module, so it pickles and compares by value."""

    names: list[str]
    views: list[LayerView]
    bn_after: list[bool]
    has_bias: list[bool]

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.views[0].n_in, *[v.n_out for v in self.views])

    @property
    def bn_approx(self) -> bool:
        return any(self.bn_after)

    @property
    def num_weights(self) -> int:
        """m: weights and biases of the block."""
        return sum(v.n_out * v.n_in * v.kernel + (v.n_out if bias else 0)
                   for v, bias in zip(self.views, self.has_bias))

    @property
    def num_hidden(self) -> int:
        """H: hidden nodes of the block."""
        return sum(self.widths[1:-1])

    def record(self) -> dict:
        """Builtin types only (for `state_dict()` and `torch.load(weights_only=True)`)."""
        return {"names": list(self.names),
                "views": [[v.n_out, v.n_in, v.kernel, v.centre] for v in self.views],
                "bn_after": [bool(b) for b in self.bn_after],
                "has_bias": [bool(b) for b in self.has_bias]}

    @classmethod
    def from_record(cls, record: dict) -> "BlockLayout":
        return cls(list(record["names"]), [LayerView(*v) for v in record["views"]],
                   list(record["bn_after"]), list(record["has_bias"]))


@dataclass
class ChainBlock:
    """Layers of one chain block, in forward order."""

    names: list[str]              # qualified module names, e.g. "net.3"
    modules: list[nn.Module]
    bn_after: list[bool] = field(default_factory=list)   # batch norm follows layer i

    def __post_init__(self):
        if not self.bn_after:
            self.bn_after = [False] * len(self.modules)

    @property
    def views(self) -> list[LayerView]:
        views = []
        for k, module in enumerate(self.modules):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                views.append(LayerView(module.out_channels, module.in_channels, kh * kw,
                                       (kh // 2) * kw + kw // 2))
            else:
                n_in = module.in_features if k == 0 else _out_nodes(self.modules[k - 1])
                views.append(LayerView(module.out_features, n_in, module.in_features // n_in, 0))
        return views

    @property
    def widths(self) -> tuple[int, ...]:
        views = self.views
        return (views[0].n_in, *[v.n_out for v in views])

    @property
    def bn_approx(self) -> bool:
        return any(self.bn_after)

    @property
    def num_weights(self) -> int:
        """m: weights and biases of the block."""
        return sum(p.numel() for m in self.modules for p in m.parameters(recurse=False))

    @property
    def num_hidden(self) -> int:
        """H: hidden nodes of the block."""
        return sum(self.widths[1:-1])

    def layout(self) -> BlockLayout:
        return BlockLayout(list(self.names), self.views, list(self.bn_after),
                           [m.bias is not None for m in self.modules])


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


def _is_pass_through(node: fx.Node, modules: dict[str, nn.Module], bn: str) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, _PASS_MODULES) or (
            bn == "approx" and isinstance(module, _BN_MODULES))
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


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FLATTENS)
    return node.target in (torch.flatten, "flatten")


def _next_layer(node: fx.Node, modules: dict[str, nn.Module],
                bn: str) -> tuple[fx.Node | None, bool, str]:
    """Follow the single-user chain from a layer's output to the next layer, if any.

    Returns (next layer node or None, batch norm seen on the way, why not)."""
    seen_relu = seen_bn = seen_flatten = False
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            why = "its output is used more than once" if users else "its output is unused"
            return None, False, why
        user = users[0]
        if user.op == "call_module" and _is_layer(modules[user.target]):
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, False, "it feeds the next layer in an unexpected way"
            if not seen_relu:
                return None, False, "it feeds the next layer without a ReLU in between"
            this, nxt = modules[node.target], modules[user.target]
            if isinstance(nxt, nn.Conv2d) and (isinstance(this, nn.Linear) or seen_flatten):
                return None, False, "a convolution reads a flattened or linear output"
            if isinstance(this, nn.Conv2d) and isinstance(nxt, nn.Linear) and (
                    not seen_flatten or nxt.in_features % this.out_channels):
                return None, False, "a Linear layer reads conv channels without a flatten"
            return user, seen_bn, ""
        if _is_relu(user, modules):
            seen_relu = True
        elif user.op == "call_module" and isinstance(modules[user.target], _BN_MODULES) \
                and bn == "approx":
            seen_bn = True
        elif not _is_pass_through(user, modules, bn):
            what = user.target if user.op != "call_module" else type(modules[user.target]).__name__
            return None, False, f"it is followed by {getattr(what, '__name__', what)}"
        if _is_flatten(user, modules):
            seen_flatten = True
        # the activation must be the first argument, and no other tensor may flow in
        if user.args[0] is not current or any(isinstance(a, fx.Node) for a in user.args[1:]):
            return None, False, "an activation is combined with another tensor"
        current = user


def find_chain_blocks(model: nn.Module, bn: str = "approx") -> Discovery:
    if bn not in BN_MODES:
        raise ValueError(f"Invalid bn={bn!r}. Must be one of {', '.join(map(repr, BN_MODES))}.")
    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    linear_nodes = [n for n in graph_module.graph.nodes
                    if n.op == "call_module" and _is_layer(modules[n.target])]
    calls: dict[str, int] = {}
    for n in linear_nodes:
        calls[n.target] = calls.get(n.target, 0) + 1
    notes: list[str] = []
    successor: dict[fx.Node, fx.Node] = {}
    bn_between: dict[fx.Node, bool] = {}
    for n in linear_nodes:
        if calls[n.target] > 1:
            notes.append(f"{n.target}: called {calls[n.target]} times in forward")
            continue
        nxt, seen_bn, why = _next_layer(n, modules, bn)
        if nxt is not None and calls[nxt.target] == 1:
            successor[n] = nxt
            bn_between[n] = seen_bn
        elif why and why != "its output is unused":
            notes.append(f"{n.target}: not joined to a next layer ({why})")
    has_predecessor = set(successor.values())
    blocks = []
    for n in linear_nodes:
        if n in successor and n not in has_predecessor:
            chain = [n]
            while chain[-1] in successor:
                chain.append(successor[chain[-1]])
            bn_after = [bn_between.get(c, False) for c in chain]
            last_users = list(chain[-1].users)      # batch norm right after the last layer
            bn_after[-1] = bn == "approx" and len(last_users) == 1 and (
                last_users[0].op == "call_module"
                and isinstance(modules[last_users[0].target], _BN_MODULES))
            blocks.append(ChainBlock([c.target for c in chain], [modules[c.target] for c in chain],
                                     bn_after))

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
