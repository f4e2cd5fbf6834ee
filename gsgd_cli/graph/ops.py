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
           "NORM_OPS"]


class Op(enum.Enum):
    """What an operation is to a ReLU network (the kinds the optimizers' policies tell apart)."""

    LAYER = "a linear layer (nn.Linear / nn.Conv2d)"
    RELU = "ReLU: positively homogeneous of degree 1, per unit"
    DROPOUT = "nn.Dropout / F.dropout: per unit (identity in eval)"
    DROPOUT_ND = "channel dropout (Dropout1d/2d/3d): per unit"
    IDENTITY = "identity"
    FLATTEN = "a flatten (nn.Flatten, torch.flatten, x.flatten())"
    RESHAPE = "another reshape (torch.reshape, x.view, x.reshape)"
    AVG_POOL_2D = "2-d average pooling: fixed coefficients"
    MAX_POOL_2D = "2-d max pooling: data-dependent"
    MAX_POOL_ND = "1-d / 3-d max pooling: data-dependent"
    PAD_2D = "2-d zero padding"
    BATCH_NORM_1D = "nn.BatchNorm1d"
    BATCH_NORM_2D = "nn.BatchNorm2d"
    NORM = "another normalisation: not a sum over paths"
    ADD = "a sum of tensors: a join"
    MEAN = "a mean: average pooling"
    METADATA = "reads shapes only (size, dim)"
    OTHER = "anything else"


MODULE_OPS: dict[type, Op] = {
    nn.Linear: Op.LAYER, nn.Conv2d: Op.LAYER,
    nn.ReLU: Op.RELU,
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


def module_op(module: nn.Module, exact: bool = False) -> Op:
    """The kind of `module`: by its exact type, or (default) by the first class of its class
    hierarchy that the table names."""
    if exact:
        return MODULE_OPS.get(type(module), Op.OTHER)
    for cls in type(module).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    return Op.OTHER


def node_op(node: fx.Node, modules: dict[str, nn.Module], exact: bool = False) -> Op:
    """The kind of a traced node (`modules`: the traced module's `named_modules()`)."""
    if node.op == "call_module":
        return module_op(modules[node.target], exact)
    if node.op == "call_function":
        return FUNCTION_OPS.get(node.target, Op.OTHER)
    if node.op == "call_method":
        return METHOD_OPS.get(node.target, Op.OTHER)
    return Op.OTHER


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
