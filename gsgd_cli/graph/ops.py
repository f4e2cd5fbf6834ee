"""What each module, function and tensor method met in a traced forward is to a ReLU network:
the ONE table both optimizers read (G-SGD's chain discovery in `gspace/joins.py`, `blocks.py`,
`coverage.py`; Path-SGD's squared-weight copy in `pathnorm/squared_copy.py`). Each optimizer
keeps its own policy over these kinds (what it may follow, rewrite or must refuse); a fix to
what counts as, say, ReLU-like is made here once and reaches both.

Every module type, function and method name appears in exactly one table below. A module is
looked up by its exact type (`module_op(m, exact=True)`) or by its class hierarchy (the first
base class in the table: a subclass of `nn.ReLU` is `RELU`), as each policy needs."""
from __future__ import annotations

import enum
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Op", "MODULE_OPS", "FUNCTION_OPS", "METHOD_OPS", "module_op", "node_op",
           "METADATA_ATTRIBUTES", "SIZE_ARITHMETIC", "is_metadata", "data_users",
           "NORM_OPS", "hidden_behaviour", "global_hooks", "masked_relu"]


class Op(enum.Enum):
    """What an operation is to a ReLU network (the kinds the optimizers' policies tell apart)."""

    LAYER = "a linear layer (nn.Linear / nn.Conv2d)"
    RELU = "ReLU: positively homogeneous of degree 1, per unit"
    HOMOGENEOUS = ("another activation positively homogeneous of degree 1 per element, "
                   "sigma(c x) = c sigma(x) for c > 0 (LeakyReLU, PReLU, abs)")
    SCALE = "a multiplication or division by a constant number: linear, per unit"
    DROPOUT = "nn.Dropout / F.dropout: per unit (identity in eval)"
    DROPOUT_ND = "channel dropout (Dropout1d/2d/3d): per unit"
    IDENTITY = "identity"
    FLATTEN = "a flatten (nn.Flatten, torch.flatten, x.flatten())"
    RESHAPE = "another reshape (torch.reshape, x.view, x.reshape)"
    AVG_POOL_2D = "2-d average pooling: fixed coefficients"
    MAX_POOL_2D = "2-d max pooling: data-dependent"
    MAX_POOL_ND = "1-d / 3-d max pooling: data-dependent"
    PAD_2D = "2-d zero padding"
    UPSAMPLE_2D = "upsampling (nn.Upsample, F.interpolate): fixed coefficients per channel"
    BATCH_NORM_1D = "nn.BatchNorm1d"
    BATCH_NORM_2D = "nn.BatchNorm2d"
    NORM = "another normalisation: not a sum over paths"
    ADD = "a sum of tensors: a join"
    MEAN = "a mean: average pooling"
    METADATA = "reads shapes only (size, dim)"
    OPAQUE = ("a module that computes what torch.fx does not see (forward hooks, or a "
              "forward replaced on the instance)")
    OTHER = "anything else"


MODULE_OPS: dict[type, Op] = {
    nn.Linear: Op.LAYER, nn.Conv2d: Op.LAYER,
    nn.ReLU: Op.RELU,
    nn.LeakyReLU: Op.HOMOGENEOUS, nn.PReLU: Op.HOMOGENEOUS,
    nn.Upsample: Op.UPSAMPLE_2D,          # UpsamplingNearest2d / Bilinear2d are subclasses
    nn.Dropout: Op.DROPOUT,
    nn.Dropout1d: Op.DROPOUT_ND, nn.Dropout2d: Op.DROPOUT_ND, nn.Dropout3d: Op.DROPOUT_ND,
    nn.Identity: Op.IDENTITY,
    nn.Flatten: Op.FLATTEN,
    nn.AvgPool2d: Op.AVG_POOL_2D, nn.AdaptiveAvgPool2d: Op.AVG_POOL_2D,
    nn.MaxPool2d: Op.MAX_POOL_2D, nn.AdaptiveMaxPool2d: Op.MAX_POOL_2D,
    nn.MaxPool1d: Op.MAX_POOL_ND, nn.MaxPool3d: Op.MAX_POOL_ND,
    nn.AdaptiveMaxPool1d: Op.MAX_POOL_ND, nn.AdaptiveMaxPool3d: Op.MAX_POOL_ND,
    nn.ZeroPad2d: Op.PAD_2D,
    nn.BatchNorm1d: Op.BATCH_NORM_1D, nn.BatchNorm2d: Op.BATCH_NORM_2D,
    nn.modules.batchnorm._BatchNorm: Op.NORM,        # BatchNorm3d, SyncBatchNorm, subclasses
    nn.GroupNorm: Op.NORM, nn.LayerNorm: Op.NORM, nn.LocalResponseNorm: Op.NORM,
    nn.modules.instancenorm._InstanceNorm: Op.NORM,
}

FUNCTION_OPS: dict = {
    **dict.fromkeys((torch.relu, torch.relu_, F.relu, F.relu_), Op.RELU),
    **dict.fromkeys((F.leaky_relu, F.leaky_relu_, torch.abs, torch.abs_), Op.HOMOGENEOUS),
    F.interpolate: Op.UPSAMPLE_2D,
    F.dropout: Op.DROPOUT,
    **dict.fromkeys((F.dropout1d, F.dropout2d, F.dropout3d), Op.DROPOUT_ND),
    **dict.fromkeys((F.avg_pool2d, F.adaptive_avg_pool2d), Op.AVG_POOL_2D),
    **dict.fromkeys((F.max_pool2d, F.adaptive_max_pool2d), Op.MAX_POOL_2D),
    torch.flatten: Op.FLATTEN,
    torch.reshape: Op.RESHAPE,
    **dict.fromkeys((operator.add, torch.add), Op.ADD),
    torch.mean: Op.MEAN,
}

METHOD_OPS: dict[str, Op] = {
    **dict.fromkeys(("relu", "relu_"), Op.RELU),
    **dict.fromkeys(("abs", "abs_"), Op.HOMOGENEOUS),
    "flatten": Op.FLATTEN,
    **dict.fromkeys(("view", "reshape"), Op.RESHAPE),
    "contiguous": Op.IDENTITY,
    "add": Op.ADD,
    "mean": Op.MEAN,
    **dict.fromkeys(("size", "dim"), Op.METADATA),
}

# Every normalisation (its output is not a sum over paths of weight products).
NORM_OPS = frozenset({Op.BATCH_NORM_1D, Op.BATCH_NORM_2D, Op.NORM})
# getattr(x, name) that reads metadata only, and int arithmetic on such values.
METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
SIZE_ARITHMETIC = {operator.getitem, operator.mul, operator.floordiv, operator.add}


def hidden_behaviour(module: nn.Module) -> str | None:
    """What `module` computes beyond what torch.fx records of it (a traced call of a leaf
    module is only its class's name), or None: forward (pre-)hooks on it, or a `forward` /
    `_conv_forward` replaced on the instance."""
    if module._forward_pre_hooks or module._forward_hooks:
        return "it has forward hooks (torch.fx does not trace them)"
    replaced = [name for name in ("forward", "_conv_forward") if name in vars(module)]
    if replaced:
        return (f"its {replaced[0]} is replaced on the instance (torch.fx records the "
                "class's)")
    return None


def global_hooks() -> str | None:
    """The global forward hooks (`nn.modules.module.register_module_forward_hook` /
    `_pre_hook`) that run around every module, torch.fx sees none of them; None if none."""
    from torch.nn.modules import module as torch_module
    found = [kind for kind, hooks in (("forward", torch_module._global_forward_hooks),
                                      ("forward pre", torch_module._global_forward_pre_hooks))
             if hooks]
    if not found:
        return None
    return (f"global {' and '.join(found)} hooks are registered (register_module_forward_"
            "hook / register_module_forward_pre_hook): they run around every layer and "
            "activation, and torch.fx does not see what they do; remove them (call the "
            "handle's .remove()) or register the hooks on modules outside the network")


def module_op(module: nn.Module, exact: bool = False) -> Op:
    """The kind of `module`: by its exact type, or (default) by the first class of its class
    hierarchy that the table names. A module other than a linear layer that computes what
    torch.fx does not see (`hidden_behaviour`) is `Op.OPAQUE` (a layer's own facts say so:
    `graph.layers`)."""
    if type(module) is nn.Threshold and module.threshold == 0 and module.value == 0:
        op = Op.RELU                                  # Threshold(0, 0) is ReLU
    elif exact:
        op = MODULE_OPS.get(type(module), Op.OTHER)
    else:
        op = next((MODULE_OPS[cls] for cls in type(module).__mro__ if cls in MODULE_OPS),
                  Op.OTHER)
    if op is not Op.LAYER and op is not Op.OTHER and hidden_behaviour(module):
        return Op.OPAQUE
    return op


def _argument(node: fx.Node, position: int, name: str, default=None):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Calls that are ReLU or a scaling by their arguments: clamp(x, min=0) (no max), clamp_min(x, 0),
# threshold(x, 0, 0); x * c, c * x, x / c with a number c.
_CLAMPS = {torch.clamp, torch.clip, "clamp", "clip"}
_CLAMP_MINS = {torch.clamp_min, "clamp_min"}
_MULS = {operator.mul, torch.mul, "mul"}
_DIVS = {operator.truediv, torch.div, "div"}


def _op_by_arguments(node: fx.Node) -> Op:
    target = node.target
    if target in _CLAMPS:
        low, high = _argument(node, 1, "min"), _argument(node, 2, "max")
        return Op.RELU if _is_number(low) and low == 0 and high is None else Op.OTHER
    if target in _CLAMP_MINS:
        low = _argument(node, 1, "min")
        return Op.RELU if _is_number(low) and low == 0 else Op.OTHER
    if target is F.threshold:
        return (Op.RELU if _argument(node, 1, "threshold") == 0
                and _argument(node, 2, "value") == 0 else Op.OTHER)
    if target in _MULS and len(node.args) == 2 and not node.kwargs:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        numbers = [a for a in node.args if _is_number(a)]
        return Op.SCALE if len(tensors) == 1 and len(numbers) == 1 else Op.OTHER
    if target in _DIVS and len(node.args) == 2 and not node.kwargs:
        return (Op.SCALE if isinstance(node.args[0], fx.Node) and _is_number(node.args[1])
                and node.args[1] != 0 else Op.OTHER)
    return Op.OTHER


def node_op(node: fx.Node, modules: dict[str, nn.Module], exact: bool = False) -> Op:
    """The kind of a traced node (`modules`: the traced module's `named_modules()`); a call
    not in the tables may still be ReLU or a scaling by its arguments (`_op_by_arguments`)."""
    if node.op == "call_module":
        return module_op(modules[node.target], exact)
    if node.op == "call_function":
        op = FUNCTION_OPS.get(node.target, Op.OTHER)
    elif node.op == "call_method":
        op = METHOD_OPS.get(node.target, Op.OTHER)
    else:
        return Op.OTHER
    return _op_by_arguments(node) if op is Op.OTHER else op


def is_metadata(node: fx.Node) -> bool:
    """A value computed from tensors' shapes only (an int, a torch.Size): scale-invariant."""
    if node.op == "call_method" and METHOD_OPS.get(node.target) is Op.METADATA:
        return True
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in METADATA_ATTRIBUTES
        if node.target in SIZE_ARITHMETIC:
            return all(is_metadata(a) if isinstance(a, fx.Node) else isinstance(a, int)
                       for a in node.args)
    return False


def data_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s values (not only its shape)."""
    return [u for u in node.users if not is_metadata(u)]


_COMPARES = {operator.gt, operator.ge, torch.gt, torch.ge, "gt", "ge"}
_ZEROS = {torch.zeros_like, "new_zeros"}
_MAXIMUMS = {torch.maximum, torch.max, torch.fmax, "maximum", "max", "fmax"}


def _zero_helper(user: fx.Node, node: fx.Node) -> str | None:
    """"mask" for `node > 0` / `node >= 0`, "zeros" for `zeros_like(node)`, else None."""
    if user.kwargs or not user.args or user.args[0] is not node:
        return None
    if (user.target in _COMPARES and len(user.args) == 2 and _is_number(user.args[1])
            and user.args[1] == 0):
        return "mask"
    if user.target is torch.zeros_like and len(user.args) == 1:
        return "zeros"
    return None


def masked_relu(node: fx.Node) -> fx.Node | None:
    """The node of ReLU written with a helper of `node` when `node` feeds nothing else:
    `x * (x > 0)` (or `>=`, either order) or `torch.maximum(x, torch.zeros_like(x))`
    (`max`, `fmax`, either order). None otherwise."""
    users = data_users(node)
    if len(users) != 2:
        return None
    helpers = [(u, _zero_helper(u, node)) for u in users if _zero_helper(u, node)]
    if len(helpers) != 1 or len(helpers[0][0].users) != 1:
        return None
    helper, kind = helpers[0]
    result = next(iter(helper.users))
    combine = _MULS if kind == "mask" else _MAXIMUMS
    if (result in users and result.target in combine and not result.kwargs
            and len(result.args) == 2 and set(result.args) == {node, helper}):
        return result
    return None
