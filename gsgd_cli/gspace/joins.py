"""How the output of one layer may reach the next inside a chain block (torch.fx graph walk).

Between two layers of a chain block, every operation must commute with a positive scale of
each hidden node (a feature of a Linear layer, a channel of a convolution), and the next layer
must read the hidden nodes the way G-SGD views its weight (`[n_out, n_in, K]`, see
`blocks.LayerView`). `follow(layer_node, ...)` walks from a layer's output along values with a
single data user and returns the next layer, or the reason there is none.

Where the hidden nodes sit in the value (its *node axis*) decides what may act on it:

* `"last"` (a Linear's output, any rank: the nodes are the last dimension): ReLU, dropout,
  identity, and (2-D only) BatchNorm1d; a reshape only when it keeps the last dimension (that
  keeps every element's node), which needs the shapes (`input_shape`); pooling and padding
  act on the last dimensions and are refused. The next Linear must read exactly these nodes.
* `"channel"` (a Conv2d's output: the nodes are dimension -3): also pooling, zero padding and
  BatchNorm2d (they act per channel on the last two dimensions); a flatten of every dimension
  from the channel on (`[B, C, h, w] -> [B, C*h*w]`: channel-major, as the next Linear's view
  `[out, C, h*w]` reads it) turns the axis into `"flat"`; a convolution may read it.
* `"flat"`: element-wise operations and reshapes that keep the last dimension.

With the shapes (torch.fx shape propagation on an example input, when the caller knows the
input shape) every reshape is checked exactly. Without them only the unambiguous
`flatten(x, 1)` / `nn.Flatten()` / `x.view(x.size(0), -1)` of a convolution's output is
accepted (assuming the convolution sees a batched 4-D input, as models do), and a reshape of
a Linear's output is refused with a note asking for the input shape.

Values that only read metadata (`x.size(0)`, `x.shape`, `x.dim()`) are not data users.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx, nn

from ..graph.ops import Op, data_users, is_metadata, node_op

__all__ = ["follow", "describe", "data_users", "is_metadata"]

# What each kind of operation (`graph.ops`) is to a chain; any other kind ends it.
CHAIN_KINDS = {Op.RELU: "relu", Op.DROPOUT: "elementwise", Op.DROPOUT_ND: "elementwise",
               Op.IDENTITY: "elementwise", Op.AVG_POOL_2D: "spatial", Op.MAX_POOL_2D: "spatial",
               Op.PAD_2D: "spatial", Op.FLATTEN: "reshape", Op.RESHAPE: "reshape"}
BN_KINDS = {Op.BATCH_NORM_1D: "bn1d", Op.BATCH_NORM_2D: "bn2d"}

Shapes = Callable[[fx.Node], "torch.Size | None"]


def _kind(node: fx.Node, modules: dict[str, nn.Module], bn: str) -> str:
    op = node_op(node, modules)
    if op in BN_KINDS:     # exactly BatchNorm1d/2d (a subclass may normalise differently)
        exact = bn == "approx" and node_op(node, modules, exact=True) is op
        return BN_KINDS[op] if exact else "other"
    return CHAIN_KINDS.get(op, "other")


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short name of what a node does, for notes ("cat", "LeakyReLU", "method 'sigmoid'")."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"method '{node.target}'"
    return getattr(node.target, "__name__", str(node.target))


def _arg(node: fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _is_batch_size_of(node, tensor: fx.Node) -> bool:
    """`tensor.size(0)`, `tensor.shape[0]` or `tensor.size()[0]`."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is tensor and _arg(node, 1, "dim", None) == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        whole = node.args[0]
        return isinstance(whole, fx.Node) and whole.args and whole.args[0] is tensor and (
            (whole.op == "call_function" and whole.target is getattr
             and whole.args[1] == "shape")
            or (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1))
    return False


def _flattens_from_dim_1(node: fx.Node, current: fx.Node,
                         modules: dict[str, nn.Module]) -> bool:
    """The reshape keeps dimension 0 and flattens all the others, read from the call alone."""
    if node.op == "call_module":
        module = modules[node.target]
        return module.start_dim == 1 and module.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    shape = list(node.args[1:]) if node.target in ("view", "reshape") else _arg(node, 1, "shape",
                                                                                None)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    return (shape is not None and len(shape) == 2 and _is_batch_size_of(shape[0], current)
            and shape[1] == -1)


def _only_reads(node: fx.Node, current: fx.Node, allow_sizes: bool) -> bool:
    """`current` is the first argument, and no other tensor flows in (sizes may, to a
    reshape)."""
    if not node.args or node.args[0] is not current:
        return False
    others: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), others.append)
    return all(allow_sizes and is_metadata(n) for n in others)


def _reshape_axis(axis: str, before, after) -> str | None:
    """The node axis after a reshape of shape `before` to `after`, or None if the reshape
    moves elements between nodes or makes a layout the next layer cannot read."""
    if before is None or after is None:
        return None
    if axis in ("last", "flat"):
        return axis if len(after) >= 1 and after[-1] == before[-1] else None
    # channel axis: flatten everything from the channel dimension on, channel-major
    channel = len(before) - 3
    if channel < 0:
        return None
    flat = 1
    for n in before[channel:]:
        flat *= n
    return "flat" if tuple(after) == (*before[:channel], flat) else None


def follow(layer: fx.Node, axis: str, modules: dict[str, nn.Module], bn: str,
           shapes: Shapes | None) -> tuple[fx.Node | None, bool, str]:
    """From a layer's output to the next layer node.

    `axis`: "last" for a Linear, "channel" for a Conv2d. Returns (the next layer's node or
    None, batch norm seen on the way, why there is no next layer). The next layer is any
    call of an `nn.Linear`/`nn.Conv2d` module; the caller decides whether it may join."""
    seen_relu = seen_bn = False
    current = layer
    while True:
        users = data_users(current)
        if len(users) != 1:
            return None, False, ("its output is used more than once" if users
                                 else "its output is unused")
        user = users[0]
        if user.op == "output":
            return None, False, "its output is unused"     # the model's output: a chain end
        if user.op == "call_module" and node_op(user, modules) is Op.LAYER:
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, False, "it feeds the next layer in an unexpected way"
            if not seen_relu:
                return None, False, "it feeds the next layer without a ReLU in between"
            nxt = modules[user.target]
            if isinstance(nxt, nn.Conv2d) and axis != "channel":
                return None, False, "a convolution reads a flattened or linear output"
            if isinstance(nxt, nn.Linear) and axis == "channel":
                return None, False, "a Linear layer reads conv channels without a flatten"
            return user, seen_bn, ""
        kind = _kind(user, modules, bn)
        if kind == "other":
            return None, False, f"it is followed by {describe(user, modules)}"
        if not _only_reads(user, current, allow_sizes=kind == "reshape"):
            return None, False, "an activation is combined with another tensor"
        shape_before = shapes(current) if shapes else None
        if kind == "relu":
            seen_relu = True
        elif kind == "spatial" and axis != "channel":
            return None, False, (f"{describe(user, modules)} acts on the dimensions that hold "
                                 "a Linear layer's features")
        elif kind == "bn2d" and axis != "channel" or kind == "bn1d" and (
                axis != "last" or shape_before is not None and len(shape_before) != 2):
            return None, False, (f"{describe(user, modules)} normalises another axis than "
                                 "the hidden nodes'")
        elif kind in ("bn1d", "bn2d"):
            seen_bn = True
        elif kind == "reshape":
            if shapes is not None:
                new_axis = _reshape_axis(axis, shape_before, shapes(user))
                if new_axis is None:
                    return None, False, (f"{describe(user, modules)} reshapes "
                                         f"{tuple(shape_before or ())} to "
                                         f"{tuple(shapes(user) or ())}, which mixes the hidden "
                                         "nodes with other positions")
                axis = new_axis
            elif axis in ("channel", "flat") and _flattens_from_dim_1(user, current, modules):
                axis = "flat"
            elif axis == "last":
                return None, False, (f"{describe(user, modules)} reshapes a Linear layer's "
                                     "output; pass input_shape so that G-SGD can check the "
                                     "layout")
            else:
                return None, False, (f"{describe(user, modules)} does not flatten from "
                                     "dimension 1 (pass input_shape to check other layouts)")
        current = user
