r"""Exact Path-SGD (Neyshabur, Salakhutdinov and Srebro, 2015), the baseline of G-SGD's section 5.3.

Update rule (p = 2 path regulariser, see ``shared/notes/gsgd-math.md`` section 7)::

    phi(w)^2  = sum over input->output paths P of  prod_{e in P} w_e^2
    kappa_e   = d phi(w)^2 / d (w_e^2)
              = sum over the paths through e of the product of the OTHER squared weights
              = gamma_in(a)^2 * gamma_out(b)^2                      for e = (a -> b)
    w_e      <- w_e - lr * (dL/dw_e) / (kappa_e + eps) * rho

Symbols -> arguments: ``lr`` is eta (the learning rate, the only value an ``lr_scheduler``
changes), ``eps`` is the optional floor added to kappa (default 0: exact Path-SGD), ``rho`` is
1 unless ``rescale`` is set (see below). ``dL/dw_e`` is ``p.grad``; it is read, never modified.

How kappa is computed, every step, for all edges at once: at construction the network is copied
once (``copy.deepcopy``) and traced with ``torch.fx``; each step the copy's parameters are set to
``w**2`` (biases to ``b**2``), an all-ones input of shape ``(1, *input_shape)`` is fed through it,
the outputs are summed and ``torch.autograd.grad`` of that sum with respect to the copy's
parameters gives kappa (fresh each step, never accumulated). Every activation of the copy is
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

``input_shape`` (the input's shape without the batch dimension) is inferred only when the first
parameterised layer is an ``nn.Linear`` reached from the input through flatten/ReLU/dropout only
(then it is ``(in_features,)``); conv nets must pass it, e.g. ``PathSGD(model, lr,
input_shape=(3, 32, 32))``.

Deviations from the published Path-SGD code (used as the baseline by the G-SGD authors), on
purpose:

* it stored ``model.parameters()`` as a generator and exhausted it at the first step, so from the
  second step on it trained with plain SGD; here kappa is recomputed and applied every step;
* it never zeroed the copy's gradients, so kappa accumulated over steps; here
  ``torch.autograd.grad`` gives a fresh kappa each step;
* it backpropagated ``||f(1)||^2`` of a batch of two all-ones rows instead of ``sum f(1)``, which
  is not phi^2 (outputs are weighted by themselves); here the sum is used;
* it multiplied the update by a ratio ``rho = sqrt(sum_p ||g_p|| / sum_p ||g_p/kappa_p||^2)``
  (unsquared norms over squared ones) computed on the first batch and then frozen. Here no ratio
  is applied by default (``rescale=None``). ``rescale='first'`` applies the consistent version
  ``rho = ||g|| / ||g / kappa||`` (global Euclidean norms over all parameters with a gradient),
  computed on the first step and then frozen (kept in ``state``, so it survives ``state_dict``
  round trips); ``rescale='every'`` recomputes it every step, so each update has the Euclidean
  norm of the plain SGD step ``lr * g``. Either rescaling breaks the exact invariance of Path-SGD
  under positive rescaling of hidden units (rho depends on the representation), which is why it is
  off by default.

Guard: if kappa + eps is exactly 0 for an entry whose update is needed, or an update is not
finite, ``step`` raises ``PathSGDStepError`` (a ``RuntimeError``) naming the parameter before
changing any weight; the message's first line is self-contained (for a trainer's log).

Not supported: momentum and weight decay (Path-SGD's paper has neither for this baseline),
several param groups (all parameters of the model are one group, in ``model.parameters()``
order), sparse gradients.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .validation import check_lr

__all__ = ["PathSGD", "PathSGDStepError", "needs_input_shape"]

# Keys in the optimizer's param group / state (kept here: the project has no shared key module yet).
LR = "lr"
EPS = "eps"
RESCALE = "rescale"
RESCALE_RATIO = "rescale_ratio"
_RESCALE_CHOICES = (None, "first", "every")


class PathSGDStepError(RuntimeError):
    """A Path-SGD step that would divide 0/0 or write non-finite weights; nothing was written."""


_PARAM_LAYERS = (nn.Linear, nn.Conv2d)
_PASS_MODULES = (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d)
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                 nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PASS_FUNCTIONS = (F.relu, torch.relu, torch.flatten)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_PASS_METHODS = ("relu", "relu_", "flatten", "view", "reshape", "size", "dim", "contiguous")
# Operations allowed between the input and the first Linear when input_shape is inferred.
_FLAT_SAFE_MODULES = (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)
_FLAT_SAFE_FUNCTIONS = (F.relu, torch.relu, torch.flatten, F.dropout)


def _first_argument(x, *args, **kwargs):
    """Identity (dropout in the squared-weight copy)."""
    return x
_FLAT_SAFE_METHODS = ("relu", "relu_", "flatten")


# --------------------------------------------------------------------------------------------
# Pooling with squared coefficients (used only inside the squared-weight copy).
# --------------------------------------------------------------------------------------------
class _CoefCache:
    """Per (input spatial size, device, dtype) cache of a pooling's per-output coefficient."""

    def __init__(self, make: Callable[[int, int, torch.device, torch.dtype], torch.Tensor]):
        self._make = make
        self._cache: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self._make(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return self._cache[key]


def _avg_pool2d_coef(kwargs: dict) -> _CoefCache:
    """Coefficient of each output of ``F.avg_pool2d(**kwargs)``: 1 / its divisor.

    avg_pool2d(ones) = n_valid / divisor and the same pooling with ``divisor_override=1`` gives
    n_valid, so their ratio is 1 / divisor for every padding / ceil_mode / count_include_pad /
    divisor_override combination.
    """
    def make(h, w, device, dtype):
        ones = torch.ones(1, 1, h, w, device=device, dtype=dtype)
        mean = F.avg_pool2d(ones, **kwargs)
        total = F.avg_pool2d(ones, **{**kwargs, "divisor_override": 1})
        return mean / total
    return _CoefCache(make)


def _adaptive_windows(n: int, out: int) -> torch.Tensor:
    idx = torch.arange(out, dtype=torch.int64)
    start = torch.div(idx * n, out, rounding_mode="floor")
    end = -torch.div(-(idx + 1) * n, out, rounding_mode="floor")  # ceil((i+1) n / out)
    return end - start


def _adaptive_avg_pool2d_coef() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    cache: dict = {}

    def coef(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), tuple(y.shape[-2:]), x.device, x.dtype)
        if key not in cache:
            sh = _adaptive_windows(x.shape[-2], y.shape[-2])
            sw = _adaptive_windows(x.shape[-1], y.shape[-1])
            cache[key] = (1.0 / (sh[:, None] * sw[None, :]).to(torch.float64)).to(
                device=x.device, dtype=x.dtype)
        return cache[key]
    return coef


class _SquaredAvgPool2d(nn.Module):
    """``AvgPool2d`` whose coefficients are squared: output * (1 / divisor)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self._coef = _avg_pool2d_coef(kwargs)

    def forward(self, x):
        return F.avg_pool2d(x, **self.kwargs) * self._coef(x)


class _SquaredAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` whose coefficients are squared: output * (1 / window size)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size
        self._coef = _adaptive_avg_pool2d_coef()

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, self.output_size)
        return y * self._coef(x, y)


def _sq_avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None):
    kwargs = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad, divisor_override=divisor_override)
    return F.avg_pool2d(x, **kwargs) * _avg_pool2d_coef(kwargs)(x)


def _sq_adaptive_avg_pool2d(x, output_size):
    y = F.adaptive_avg_pool2d(x, output_size)
    return y * _adaptive_avg_pool2d_coef()(x, y)


def _sq_mean(x, *args, **kwargs):
    """``mean`` with its coefficient 1/N squared (N = number of averaged entries)."""
    if "dtype" in kwargs:
        raise ValueError("PathSGD: mean(..., dtype=...) is not supported")
    y = torch.mean(x, *args, **kwargs)
    return y * (y.numel() / x.numel())


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
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"PathSGD could not trace the model with torch.fx ({type(exc).__name__}: {exc}). "
            "Path-SGD supports Linear/Conv2d layers joined by ReLU, flatten, average pooling, "
            "dropout and residual sums, written without data-dependent control flow.") from exc


def _check_and_square_pools(gm: fx.GraphModule) -> tuple[list[fx.Node], Optional[tuple]]:
    """Validate every node of the traced copy; replace poolings by squared-coefficient ones.

    Returns the parameterised-layer nodes in graph order and the inferred input shape (or None).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _unsupported("this model", f"its forward takes {len(placeholders)} inputs; "
                                         "exactly one input tensor is supported")
    layer_nodes: list[fx.Node] = []
    seen_modules: set[str] = set()
    seen_params: dict[int, str] = {}
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
            if isinstance(mod, _NORM_MODULES):
                raise _unsupported(
                    f"normalisation: module '{node.target}' ({type(mod).__name__})",
                    "its output is not a sum over paths of weight products, so the "
                    "squared-weight construction does not give the path norm; remove it or use "
                    "another optimizer")
            if isinstance(mod, _MAX_POOLS):
                raise _unsupported(
                    f"max pooling: module '{node.target}' ({type(mod).__name__})",
                    "which input it passes depends on the data, so it has no fixed path "
                    "structure; use average pooling or a strided convolution")
            if type(mod) in _PARAM_LAYERS:
                if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                    raise _unsupported(
                        f"module '{node.target}' (Conv2d, padding_mode={mod.padding_mode!r})",
                        "only padding_mode='zeros' is supported")
                if node.target in seen_modules:
                    raise _unsupported(f"module '{node.target}' ({type(mod).__name__})",
                                       "it is applied more than once in forward")
                seen_modules.add(node.target)
                for pname, p in mod.named_parameters(recurse=False):
                    if id(p) in seen_params:
                        raise _unsupported(
                            f"module '{node.target}' ({type(mod).__name__})",
                            f"its {pname} is shared with '{seen_params[id(p)]}'")
                    seen_params[id(p)] = f"{node.target}.{pname}"
                if not layer_nodes and flat_safe_prefix and isinstance(mod, nn.Linear):
                    inferred = (mod.in_features,)
                layer_nodes.append(node)
                continue
            if type(mod) in _PASS_MODULES:
                if not isinstance(mod, _FLAT_SAFE_MODULES):
                    flat_safe_prefix = False
                continue
            if type(mod) is nn.AvgPool2d:
                new = _SquaredAvgPool2d(kernel_size=mod.kernel_size, stride=mod.stride,
                                        padding=mod.padding, ceil_mode=mod.ceil_mode,
                                        count_include_pad=mod.count_include_pad,
                                        divisor_override=mod.divisor_override)
            elif type(mod) is nn.AdaptiveAvgPool2d:
                new = _SquaredAdaptiveAvgPool2d(mod.output_size)
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
            if node.target in _DROPOUT_FUNCTIONS:
                # F.dropout(x, p) defaults to training=True: make it the identity in the copy.
                node.target = _first_argument
                continue
            if node.target in _PASS_FUNCTIONS:
                if node.target not in _FLAT_SAFE_FUNCTIONS:
                    flat_safe_prefix = False
                continue
            if node.target in (operator.add, torch.add):
                _check_tensor_sum(node)
                flat_safe_prefix = False
                continue
            if node.target is F.avg_pool2d:
                node.target = _sq_avg_pool2d
            elif node.target is F.adaptive_avg_pool2d:
                node.target = _sq_adaptive_avg_pool2d
            elif node.target is torch.mean:
                node.target = _sq_mean
            else:
                raise _unsupported(_describe(node), "only ReLU, flatten, dropout, average "
                                   "pooling and residual sums may join the Linear/Conv2d layers")
            flat_safe_prefix = False
            continue
        if node.op == "call_method":
            if node.target in _PASS_METHODS:
                if node.target not in _FLAT_SAFE_METHODS:
                    flat_safe_prefix = False
                continue
            if node.target == "add":
                _check_tensor_sum(node)
                flat_safe_prefix = False
                continue
            if node.target == "mean":
                # x.mean(dims) -> _sq_mean(x, dims)
                node.op = "call_function"
                node.target = _sq_mean
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
    gm = _trace(copy.deepcopy(model).eval())
    _, inferred = _check_and_square_pools(gm)
    return inferred is None


def _check_number(name: str, value) -> float:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}. Must be a finite number >= 0.")
    return float(value)


class PathSGD(torch.optim.Optimizer):
    """Exact Path-SGD; see the module docstring for the rule, supported layers and deviations.

    Args:
        model: the ``nn.Module`` to train (not its parameters). All its parameters form one param
            group, in ``model.parameters()`` order.
        lr: learning rate eta (a finite number > 0).
        rescale: ``None`` (default, exact Path-SGD), ``'first'`` or ``'every'``: multiply the
            update by ``rho = ||g|| / ||g / kappa||``, frozen after the first step or recomputed
            every step (a consistent version of the published code's ratio; not invariant).
        eps: added to kappa before dividing (default 0.0; > 0 breaks the exact invariance).
        input_shape: the input's shape without the batch dimension; required for conv nets.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, *, rescale: Optional[str] = None,
                 eps: float = 0.0, input_shape: Optional[Sequence[int]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}. Must be a torch.nn.Module "
                            "(PathSGD takes the model, not its parameters).")
        lr = check_lr(lr)
        eps = _check_number("eps", eps)
        if not (rescale is None or (isinstance(rescale, str) and rescale in _RESCALE_CHOICES)):
            raise ValueError(f"Invalid rescale={rescale!r}. Must be None, 'first' or 'every'.")
        if input_shape is not None:
            if (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence)
                    or len(input_shape) == 0
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                               for s in input_shape)):
                raise ValueError(f"Invalid input_shape={input_shape!r}. Must be a non-empty "
                                 "sequence of positive integers (the input shape without the "
                                 "batch dimension).")
            input_shape = tuple(int(s) for s in input_shape)

        named = list(model.named_parameters())
        if not named:
            raise ValueError("Invalid model: it has no parameters.")
        params = [p for _, p in named]
        self._param_names = [n for n, _ in named]

        # The private squared-weight copy: deep-copied once, eval mode, traced, pools squared.
        shadow = copy.deepcopy(model).eval()
        for p in shadow.parameters():
            p.requires_grad_(True)
        gm = _trace(shadow)
        _, inferred = _check_and_square_pools(gm)
        if input_shape is None:
            if inferred is None:
                raise ValueError(
                    "PathSGD needs input_shape for this model (its first layer is not an "
                    "nn.Linear reached by flatten/ReLU only, e.g. a conv net): pass "
                    "input_shape=(C, H, W), the shape of one input without the batch dimension; "
                    "kappa of a convolution depends on the image size.")
            input_shape = inferred
        self._input_shape = input_shape
        self._shadow = gm
        shadow_params = dict(gm.named_parameters())
        # Shadow parameter for each model parameter (None: not inside a Linear/Conv2d used in
        # forward; such a parameter may not receive a gradient).
        self._shadow_params: list[Optional[torch.Tensor]] = [
            shadow_params.get(n) for n in self._param_names]

        defaults = {LR: lr, EPS: eps, RESCALE: rescale}
        super().__init__(params, defaults)

        # Trial run: the input shape must fit, and the output must be one tensor.
        try:
            kappas = self._compute_kappa()
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"PathSGD could not run the squared-weight copy on an all-ones input "
                             f"of shape (1, *{input_shape}): {type(exc).__name__}: {exc}. Check "
                             "input_shape.") from exc
        del kappas

    # -- torch.optim.Optimizer plumbing ---------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("PathSGD keeps all parameters of its model in one param group; "
                             "add_param_group is not supported.")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault(EPS, 0.0)
            group.setdefault(RESCALE, None)

    # -- kappa -----------------------------------------------------------------------------------
    def _sync_shadow(self, params: list[torch.Tensor]) -> None:
        """Follow the model if it was moved to another device or dtype after construction."""
        ref = params[0]
        first = next(iter(self._shadow.parameters()))
        if first.device != ref.device or first.dtype != ref.dtype:
            self._shadow.to(device=ref.device, dtype=ref.dtype)
            names = dict(self._shadow.named_parameters())
            self._shadow_params = [names.get(n) for n in self._param_names]

    def _compute_kappa(self) -> list[Optional[torch.Tensor]]:
        params = self.param_groups[0]["params"]
        self._sync_shadow(params)
        pairs = [(s, p) for s, p in zip(self._shadow_params, params) if s is not None]
        shadow = [s for s, _ in pairs]
        with torch.no_grad():
            src = [p.detach() for _, p in pairs]
            torch._foreach_copy_(shadow, torch._foreach_mul(src, src))
        ref = params[0]
        ones = torch.ones((1, *self._input_shape), device=ref.device, dtype=ref.dtype)
        with torch.enable_grad():
            out = self._shadow(ones)
            if not isinstance(out, torch.Tensor):
                raise TypeError("the model's forward must return one tensor")
            grads = torch.autograd.grad(out.sum(), shadow, allow_unused=True)
        it = iter(grads)
        kappa: list[Optional[torch.Tensor]] = []
        for s in self._shadow_params:
            if s is None:
                kappa.append(None)
                continue
            g = next(it)
            kappa.append(torch.zeros_like(s) if g is None else g.detach())
        return kappa

    def compute_kappa(self) -> list[Optional[torch.Tensor]]:
        """kappa for every parameter at the current weights (``None`` where not applicable)."""
        return self._compute_kappa()

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One Path-SGD step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = group["params"]
        lr, eps, rescale = group[LR], group[EPS], group[RESCALE]
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        if not idx:
            return loss
        for i in idx:
            if params[i].grad.is_sparse:
                raise RuntimeError(f"PathSGD does not support sparse gradients "
                                   f"(parameter '{self._param_names[i]}').")
            if self._shadow_params[i] is None:
                raise RuntimeError(
                    f"PathSGD: parameter '{self._param_names[i]}' has a gradient but is not the "
                    "weight or bias of an nn.Linear/nn.Conv2d used in forward, so it lies on no "
                    "path; freeze it (requires_grad=False) or use another optimizer for it.")
        with torch.no_grad():
            kappa_all = self._compute_kappa()
            ps = [params[i] for i in idx]
            grads = [params[i].grad for i in idx]
            kappas = [kappa_all[i] for i in idx]
            if eps:
                kappas = torch._foreach_add(kappas, eps)
            # kappa_e = 0 means every path through e has another zero weight (or e meets only
            # zero padding), and then dL/dw_e = 0 too: such a weight's step is 0, not 0/0.
            # A zero kappa with a non-zero gradient cannot come from backprop: it is an error.
            updates = [g / torch.where(k == 0, torch.ones_like(k), k)
                       for g, k in zip(grads, kappas)]
            # One device sync for the guard.
            bad = torch.stack([((k == 0) & (g != 0)).any() | ~torch.isfinite(u).all()
                               for k, g, u in zip(kappas, grads, updates)])
            if bool(bad.any()):
                self._raise_guard(idx, kappas, updates, grads)
            if rescale is not None:
                ratio = self._rescale_ratio(rescale, grads, updates, params[0])
                torch._foreach_mul_(updates, ratio)
            torch._foreach_add_(ps, updates, alpha=-lr)
        return loss

    def _rescale_ratio(self, rescale, grads, updates, first_param) -> torch.Tensor:
        state = self.state[first_param]
        if rescale == "first" and RESCALE_RATIO in state:
            return state[RESCALE_RATIO]
        g2 = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum()
        u2 = torch.stack([torch.linalg.vector_norm(u) ** 2 for u in updates]).sum()
        ratio = torch.sqrt(g2 / u2)
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        if rescale == "first":
            state[RESCALE_RATIO] = ratio
        return ratio

    def _raise_guard(self, idx, kappas, updates, grads) -> None:
        for i, k, u, g in zip(idx, kappas, updates, grads):
            name, shape = self._param_names[i], tuple(k.shape)
            n_zero = int(((k == 0) & (g != 0)).sum())
            if n_zero:
                raise PathSGDStepError(
                    f"PathSGD: kappa is 0 but the gradient is not for {n_zero} of {k.numel()} "
                    f"entries of parameter '{name}' {shape}: no path with non-zero weights "
                    "runs through them, so that gradient did not come from backpropagating "
                    "through this model. Check what sets .grad, or pass eps > 0 to divide by "
                    "kappa + eps (not exactly invariant).")
            if not bool(torch.isfinite(u).all()):
                what = ("its gradient is not finite" if not bool(torch.isfinite(g).all()) else
                        "kappa is not finite or too small (overflow/underflow)")
                raise PathSGDStepError(
                    f"PathSGD: non-finite update for parameter '{name}' {shape}: {what}. Lower "
                    "lr, check the loss for NaN/Inf, or train in float64; eps > 0 bounds the "
                    "step where kappa underflows.")
