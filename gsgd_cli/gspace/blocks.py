"""Find a model's chain blocks: runs of layers joined only by ReLU, by tracing with torch.fx.

A chain block is a sequence of layers `f_0, f_1, ...` (`nn.Linear`, or `nn.Conv2d` with
`groups=1` and zero padding) where the output of `f_i` reaches `f_{i+1}` through ReLU (at
least one) and operations that commute with a positive scale of each hidden node (dropout,
identity; for convolutions also average and max pooling, zero padding, and the flatten that
feeds a Linear layer), and through nothing else: every intermediate value has exactly one data
user, so no hidden activation leaks out (a skip connection reading it would break the
invariance). `joins.py` has the rules, including where a flatten or reshape may sit (checked
exactly from the shapes when `input_shape` is known). The block's input and output nodes are
not rescaled, so anything may come before its first and after its last layer; in a residual
block the shortcut pins the block's input and output channels and the chain lies inside it.

A layer is left out of every block (with a note saying why) when G-SGD could not rescale it
exactly: a grouped or non-zero-padded convolution, a subclass with its own forward, a
parametrized weight (`weight_norm`, ...) or one that is not a plain parameter, forward hooks, a
layer called more than once, a parameter shared with another module or read outside the
module in forward (`F.linear(h, self.fc.weight.t())`).

A hidden node is a feature of a Linear layer or a channel of a convolution. Every layer is seen
as `[n_out, n_in, K]`: K parallel edges per node pair (the kernel elements of a convolution;
the spatial positions when a Linear layer reads a flattened feature map of `n_in` channels).
The skeleton edge of a node pair is the kernel centre (offset 0 for a Linear layer).

With `bn="approx"`, batch norm between two layers is let through as well and the layer it
follows is flagged: G-SGD then applies the paper's approximation (appendix 11.2) to it, since
batch norm makes each filter scale-invariant by itself and the chain is no longer exactly
invariant. With `bn="split"` batch norm ends a chain.

Parameters outside every chain block (a lone Linear, normalisation layers, ...) are listed in
`Discovery.outside` and take a plain SGD step; `Discovery.notes` says, per layer, why it is not
a chain layer or why its chain ends there.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..graph.layers import LayerFacts, read_layers
from ..graph.ops import Op, module_op
from ..graph.trace import ModelNotTraceable, trace  # noqa: F401  (re-exported for callers)
from .joins import data_users, follow

_BN_OPS = (Op.BATCH_NORM_1D, Op.BATCH_NORM_2D)

BN_MODES = ("approx", "split")


@dataclass(frozen=True)
class LayerView:
    """A layer seen as `[n_out, n_in, K]`, skeleton edges at kernel offset `centre`."""

    n_out: int
    n_in: int
    kernel: int
    centre: int


def _out_nodes(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def layer_problem(facts: LayerFacts) -> str | None:
    """Why a layer (its `graph.layers` facts) cannot be a layer of a chain block (None: it can)."""
    if facts.forward_overridden:
        return f"{facts.type_name} overrides forward"
    if facts.groups != 1:
        return f"a grouped convolution (groups={facts.groups})"
    if facts.padding_mode != "zeros":
        return f"padding_mode='{facts.padding_mode}' (only zero padding commutes with scaling)"
    if facts.parametrized:
        return ("its weight is parametrized (e.g. weight_norm): G-SGD would step the computed "
                "weight, not the parameters")
    if facts.not_plain is not None:
        return (f"its {facts.not_plain} is not a plain parameter (weight_norm, pruning or an "
                "uninitialised lazy layer)")
    if facts.hooks:
        return "it has forward hooks (they may change what it computes)"
    if facts.calls > 1:
        return f"called {facts.calls} times in forward"
    if facts.attribute_read is not None:
        return f"'{facts.attribute_read}' is also used outside the module, in forward"
    if facts.shared:
        return "it shares a parameter with another module"
    return None


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
    notes: list[str] = field(default_factory=list)   # 'layer: why' (see the docstring)


def _trace(model: nn.Module) -> fx.GraphModule:
    return trace(model, "G-SGD finds chain blocks by tracing, so the forward must avoid "
                        "data-dependent control flow")


def propagate_shapes(graph_module: fx.GraphModule, model: nn.Module,
                     input_shape: tuple[int, ...]):
    """Shapes of every value for a batch of 2 inputs of `input_shape` (fake tensors: nothing
    is computed, no buffer changes). Returns `node -> torch.Size or None`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    inputs = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"input_shape describes one input, and the forward of "
                         f"{type(model).__name__} takes {len(inputs)}")
    first = next(iter(model.parameters()), None)
    like = dict(dtype=first.dtype, device=first.device) if first is not None else {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    where = {"node": None}

    class _Shapes(ShapeProp):
        def run_node(self, n):                    # remember where a failure happens
            where["node"] = n
            return super().run_node(n)

    # torch logs a failing fake-tensor op and ShapeProp prints its traceback: the error below
    # says it in one line instead
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode, contextlib.redirect_stderr(io.StringIO()):
            example = torch.zeros(2, *input_shape, **like)
            _Shapes(graph_module, fake_mode=mode).propagate(example)
    except Exception as exc:  # the model's own error, whatever its type
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        text = str(cause).strip()
        first_line = text.splitlines()[0].rstrip(".") if text else type(cause).__name__
        node = where["node"]
        at = f" at {node.target if node.op != 'call_function' else node.name}" if node else ""
        raise ValueError(f"{type(model).__name__} does not run on an input of shape "
                         f"(2, *{tuple(input_shape)}){at}: {first_line}; check "
                         "input_shape") from None
    finally:
        fake_log.setLevel(level)

    def shape(node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return shape


def find_chain_blocks(model: nn.Module, bn: str = "approx",
                      input_shape: tuple[int, ...] | None = None) -> Discovery:
    """The chain blocks of `model` (see the module docstring and `joins.py`).

    `input_shape` (one input without the batch dimension, e.g. `(3, 32, 32)`): the shapes of
    every value are propagated and every reshape between two layers is checked exactly;
    without it only the usual `flatten(x, 1)` of a convolution's output joins two layers."""
    if bn not in BN_MODES:
        raise ValueError(f"Invalid bn={bn!r}. Must be one of {', '.join(map(repr, BN_MODES))}.")
    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    shapes = (propagate_shapes(graph_module, model, tuple(input_shape))
              if input_shape is not None else None)
    layers = read_layers(graph_module, model)
    layer_nodes = [n for n in graph_module.graph.nodes
                   if n.op == "call_module" and n.target in layers]
    problems: dict[str, str] = {}
    for name, facts in layers.items():
        why = layer_problem(facts)
        if why is not None:
            problems[name] = why
    notes = [f"{name}: not a chain layer ({why})" for name, why in problems.items()]
    successor: dict[fx.Node, fx.Node] = {}
    bn_between: dict[fx.Node, bool] = {}
    for n in layer_nodes:
        if n.target in problems:
            continue
        this = modules[n.target]
        nxt, seen_bn, why = follow(n, "last" if isinstance(this, nn.Linear) else "channel",
                                   modules, bn, shapes)
        if nxt is not None and nxt.target in problems:
            nxt, why = None, f"it feeds '{nxt.target}', which is not a chain layer"
        if (nxt is not None and isinstance(this, nn.Conv2d) and isinstance(modules[nxt.target],
                                                                            nn.Linear)
                and modules[nxt.target].in_features % this.out_channels):
            nxt, why = None, (f"'{nxt.target}' reads {modules[nxt.target].in_features} "
                              f"features, not a multiple of {this.out_channels} channels")
        if nxt is not None:
            successor[n] = nxt
            bn_between[n] = seen_bn
        elif why != "its output is unused":
            notes.append(f"{n.target}: not joined to a next layer ({why})")
    has_predecessor = set(successor.values())
    blocks = []
    for n in layer_nodes:
        if n in successor and n not in has_predecessor:
            chain = [n]
            while chain[-1] in successor:
                chain.append(successor[chain[-1]])
            bn_after = [bn_between.get(c, False) for c in chain]
            last_users = data_users(chain[-1])      # batch norm right after the last layer
            bn_after[-1] = bn == "approx" and len(last_users) == 1 and (
                last_users[0].op == "call_module"
                and module_op(modules[last_users[0].target], exact=True) in _BN_OPS)
            blocks.append(ChainBlock([c.target for c in chain], [modules[c.target] for c in chain],
                                     bn_after))
    in_block = {id(p) for b in blocks for m in b.modules for p in m.parameters()}
    outside = [(name, p) for name, p in model.named_parameters() if id(p) not in in_block]
    return Discovery(blocks, outside, notes)
