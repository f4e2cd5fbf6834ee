"""The squared-weight copy of a ReLU network, whose gradient on an all-ones input is Path-SGD's
kappa (the update rule is in `gsgd_cli.optim.path_sgd`; the supported networks are listed below).

`build_squared_copy(model)` traces a copy, refuses every operation whose output is not a sum over
paths of weight products (one `ValueError` naming it), makes dropout the identity and squares
each average pooling's coefficients; `needs_input_shape(model)`: whether input_shape is needed.

How kappa is computed, every step, for all edges at once: at construction the network is copied
once (``copy.deepcopy``), traced with ``torch.fx`` and rewritten so that its layers read their
weights from an input (`take_squared_weights`); each step ``w**2`` (biases ``b**2``) and an
all-ones input of shape ``(1, *input_shape)`` are fed through it, the outputs are summed and
``torch.autograd.grad`` of that sum with respect to the squared weights gives kappa (fresh each
step, never accumulated; `step.kappa`). Every activation of the copy is
>= 0 on that input, so ReLU passes everything and the sum is phi(w)^2. A bias is an edge from a
constant-1 unit; its kappa is gamma_out^2 of its unit. A convolution kernel element is one edge
per position it is applied at; its kappa is the sum over those positions (zero padding
included, which is why conv nets need the real ``input_shape``).

Supported networks (checked at construction; anything else raises ``ValueError`` naming the
module or operation):

* parameterised layers: ``nn.Linear`` and ``nn.Conv2d`` (``padding_mode='zeros'``, any stride,
  padding, dilation, groups), each used once, weights not shared;
* between them: ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``), flatten
  (``nn.Flatten``, ``torch.flatten``, ``x.flatten()``, ``x.view``/``x.reshape``), dropout
  (``nn.Dropout*``/``F.dropout*``: identity in the copy, whatever their ``training`` flag),
  ``nn.Identity``;
* residual sums ``a + b`` of two tensors (``+``, ``torch.add``, ``a.add(b)``, no ``alpha``):
  a sum has coefficient 1 on both branches, so paths through either branch are counted; an
  identity shortcut is a path segment with no weight (ResNet without batch norm);
* average pooling: ``nn.AvgPool2d``/``F.avg_pool2d`` (any kernel, stride, padding, ceil_mode,
  count_include_pad, divisor_override), ``nn.AdaptiveAvgPool2d``/``F.adaptive_avg_pool2d``
  and ``x.mean(dims)``/``torch.mean`` (global average pooling). A pooling output is
  ``sum_i c_i x_i`` with fixed coefficients ``c_i`` (e.g. 1/k^2); the path product must contain
  ``c_i^2``, but the squared-weight copy would only apply ``c_i`` once. In the copy every pooling
  is therefore replaced by one whose coefficients are squared: its output is multiplied by the
  (per output position) coefficient once more. Verified against brute-force path enumeration.
* refused: batch/group/layer/instance norm (breaks the construction: its output is not a sum
  over paths of weight products), max pooling (its paths depend on the input), any other module
  or function, parameters used outside ``nn.Linear``/``nn.Conv2d``, tuple outputs, models that
  ``torch.fx`` cannot trace.

``compute_kappa()`` returns kappa at the current weights (one tensor per parameter, ``None``
for a parameter outside the supported layers); ``needs_input_shape(model)`` tells a trainer
whether it must pass ``input_shape``.
"""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch.nn.functional as F
from torch import fx, nn

from ..graph.layers import read_layers
from ..graph.ops import FUNCTION_OPS, METHOD_OPS, NORM_OPS, Op, module_op
from ..graph.trace import trace
from .pooling import (SquaredAdaptiveAvgPool2d, SquaredAvgPool2d, sq_adaptive_avg_pool2d,
                      sq_avg_pool2d, sq_mean)

__all__ = ["build_squared_copy", "needs_input_shape", "take_squared_weights"]

# Path-SGD's policy over the kinds of `graph.ops`: what passes unchanged into the squared copy
# (on its all-ones input every value is >= 0, so ReLU passes everything), and what may stand
# between the input and the first Linear when input_shape is inferred (keeps a flat layout).
_PASS = frozenset({Op.RELU, Op.FLATTEN, Op.IDENTITY, Op.DROPOUT, Op.DROPOUT_ND})
_PASS_METHODS = frozenset({Op.RELU, Op.FLATTEN, Op.RESHAPE, Op.METADATA, Op.IDENTITY})
_FLAT_SAFE = frozenset({Op.RELU, Op.FLATTEN, Op.IDENTITY, Op.DROPOUT})
_MAX_POOLS = frozenset({Op.MAX_POOL_2D, Op.MAX_POOL_ND})


def _first_argument(x, *args, **kwargs):
    """Identity (dropout in the squared-weight copy)."""
    return x


# --------------------------------------------------------------------------------------------
# Structure check and construction of the squared-weight copy.
# --------------------------------------------------------------------------------------------
def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method '.{node.target}()'"
    target = getattr(node.target, "__name__", repr(node.target))
    return f"function '{target}'"


def _unsupported(what: str, why: str) -> ValueError:
    return ValueError(f"PathSGD does not support {what}: {why}")


def _check_tensor_sum(node: fx.Node) -> None:
    """``a + b`` of two tensors (a residual sum) is a sum over paths with coefficient 1."""
    if (len(node.args) != 2 or node.kwargs
            or not all(isinstance(a, fx.Node) for a in node.args)):
        raise _unsupported(_describe(node), "only the sum of two tensors (a residual "
                                            "connection) is supported, not adding a constant "
                                            "or scaling by alpha")


def _trace(model: nn.Module) -> fx.GraphModule:
    return trace(model, "Path-SGD supports Linear/Conv2d layers joined by ReLU, flatten, average "
                        "pooling, dropout and residual sums, written without data-dependent "
                        "control flow.", who="PathSGD")


def _check_and_square_pools(gm: fx.GraphModule,
                            model: nn.Module) -> tuple[list[fx.Node], Optional[tuple]]:
    """Validate every node of the traced copy; replace poolings by squared-coefficient ones.

    Returns the parameterised-layer nodes in graph order and the inferred input shape (or None).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _unsupported("this model", f"its forward takes {len(placeholders)} inputs; "
                                         "exactly one input tensor is supported")
    layer_nodes: list[fx.Node] = []
    layers = read_layers(gm, model)
    seen_modules: set[str] = set()
    seen_params: set[str] = set()      # "layer.weight" of the layers met so far
    flat_safe_prefix = True
    inferred: Optional[tuple] = None
    n_pool = 0
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder",):
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise _unsupported("this model", "its forward must return one tensor "
                                                 "(tuple/dict outputs are not supported)")
            continue
        if node.op == "get_attr":
            raise _unsupported(
                f"attribute '{node.target}'", "parameters or buffers used directly in forward "
                "(outside nn.Linear/nn.Conv2d) are not supported")
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind, exact = module_op(mod), module_op(mod, exact=True)
            if kind in NORM_OPS:
                raise _unsupported(
                    f"normalisation: module '{node.target}' ({type(mod).__name__})",
                    "its output is not a sum over paths of weight products, so the "
                    "squared-weight construction does not give the path norm; remove it or use "
                    "another optimizer")
            if kind in _MAX_POOLS:
                raise _unsupported(
                    f"max pooling: module '{node.target}' ({type(mod).__name__})",
                    "which input it passes depends on the data, so it has no fixed path "
                    "structure; use average pooling or a strided convolution")
            if exact is Op.LAYER:
                facts = layers[node.target]
                if facts.padding_mode != "zeros":
                    raise _unsupported(
                        f"module '{node.target}' (Conv2d, padding_mode={facts.padding_mode!r})",
                        "only padding_mode='zeros' is supported")
                if node.target in seen_modules:
                    raise _unsupported(f"module '{node.target}' ({type(mod).__name__})",
                                       "it is applied more than once in forward")
                seen_modules.add(node.target)
                for pname, others in facts.shared:
                    earlier = [o for o in others if o in seen_params]
                    if earlier:
                        raise _unsupported(f"module '{node.target}' ({type(mod).__name__})",
                                           f"its {pname} is shared with '{earlier[0]}'")
                seen_params.update(f"{node.target}.{pname}"
                                   for pname, _ in mod.named_parameters(recurse=False))
                if not layer_nodes and flat_safe_prefix and isinstance(mod, nn.Linear):
                    inferred = (mod.in_features,)
                layer_nodes.append(node)
                continue
            if exact in _PASS:
                if exact not in _FLAT_SAFE:
                    flat_safe_prefix = False
                continue
            if type(mod) is nn.AvgPool2d:
                new = SquaredAvgPool2d(kernel_size=mod.kernel_size, stride=mod.stride,
                                        padding=mod.padding, ceil_mode=mod.ceil_mode,
                                        count_include_pad=mod.count_include_pad,
                                        divisor_override=mod.divisor_override)
            elif type(mod) is nn.AdaptiveAvgPool2d:
                new = SquaredAdaptiveAvgPool2d(mod.output_size)
            else:
                has_params = any(True for _ in mod.parameters())
                raise _unsupported(
                    f"module '{node.target}' ({type(mod).__name__})",
                    ("it has parameters and is not nn.Linear or nn.Conv2d" if has_params else
                     "only ReLU, flatten, dropout, identity, average pooling and residual sums "
                     "may join the Linear/Conv2d layers"))
            name = f"_pathsgd_squared_pool_{n_pool}"
            n_pool += 1
            gm.add_submodule(name, new)
            node.target = name
            flat_safe_prefix = False
            continue
        if node.op == "call_function":
            kind = FUNCTION_OPS.get(node.target, Op.OTHER)
            if kind in (Op.DROPOUT, Op.DROPOUT_ND):
                # F.dropout(x, p) defaults to training=True: make it the identity in the copy.
                node.target = _first_argument
                continue
            if kind in (Op.RELU, Op.FLATTEN, Op.RESHAPE):
                if kind not in _FLAT_SAFE:
                    flat_safe_prefix = False
                continue
            if kind is Op.ADD:
                _check_tensor_sum(node)
                flat_safe_prefix = False
                continue
            if node.target is F.avg_pool2d:
                node.target = sq_avg_pool2d
            elif node.target is F.adaptive_avg_pool2d:
                node.target = sq_adaptive_avg_pool2d
            elif kind is Op.MEAN:
                node.target = sq_mean
            else:
                raise _unsupported(_describe(node), "only ReLU, flatten, dropout, average "
                                   "pooling and residual sums may join the Linear/Conv2d layers")
            flat_safe_prefix = False
            continue
        if node.op == "call_method":
            kind = METHOD_OPS.get(node.target, Op.OTHER)
            if kind in _PASS_METHODS:
                if kind not in _FLAT_SAFE or kind is Op.IDENTITY:
                    flat_safe_prefix = False
                continue
            if kind is Op.ADD:
                _check_tensor_sum(node)
                flat_safe_prefix = False
                continue
            if kind is Op.MEAN:
                # x.mean(dims) -> sq_mean(x, dims)
                node.op = "call_function"
                node.target = sq_mean
                flat_safe_prefix = False
                continue
            raise _unsupported(_describe(node), "only ReLU, flatten, dropout, average pooling "
                                                "and residual sums may join the Linear/Conv2d "
                                                "layers")
        raise _unsupported(_describe(node), f"unexpected graph node kind {node.op!r}")
    if not layer_nodes:
        raise _unsupported("this model", "it has no nn.Linear or nn.Conv2d layer")
    gm.recompile()
    return layer_nodes, inferred


def needs_input_shape(model: nn.Module) -> bool:
    """True when ``PathSGD(model, ...)`` needs an explicit ``input_shape`` (conv nets)."""
    shadow = copy.deepcopy(model).eval()
    gm = _trace(shadow)
    _, inferred = _check_and_square_pools(gm, shadow)
    return inferred is None


def build_squared_copy(shadow: nn.Module) -> tuple[fx.GraphModule, Optional[tuple]]:
    """Trace `shadow` (a private copy of the model; the traced module shares its parameters),
    check every node and square its poolings. Returns the traced copy and the inferred input
    shape (None when the model does not tell it)."""
    gm = _trace(shadow)
    _, inferred = _check_and_square_pools(gm, shadow)
    return gm, inferred


def take_squared_weights(gm: fx.GraphModule, param_names: list[str]) -> list[int]:
    """Rewrite the squared copy `gm` (in place) so that its layers read their weights from a
    second input instead of their parameters: ``gm(x, squared)`` with ``squared[j]`` the
    squared model parameter ``param_names[used[j]]``; returns `used`. Each
    ``nn.Linear``/``nn.Conv2d`` call becomes the same ``F.linear``/``F.conv2d`` call its
    ``forward`` makes, so the copy computes exactly what it computed with squared parameters,
    without a copy of the weights into it each step (the layer modules are dropped)."""
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first):
        squared = graph.placeholder("squared")
    position = {name: k for k, name in enumerate(param_names)}
    used: list[int] = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if module_op(module, exact=True) is not Op.LAYER:
            continue
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_before(node):
            tensors = []
            for name in ("weight", "bias"):
                if getattr(module, name) is None:
                    tensors.append(None)
                    continue
                used.append(position[f"{node.target}.{name}"])
                tensors.append(graph.call_function(operator.getitem, (squared, len(used) - 1)))
            if isinstance(module, nn.Linear):
                new = graph.call_function(F.linear, (x, *tensors))
            else:
                new = graph.call_function(F.conv2d, (x, *tensors, module.stride, module.padding,
                                                     module.dilation, module.groups))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return used
