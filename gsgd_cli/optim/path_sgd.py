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
finite, the step changes no weight and ``PathSGDStepError`` (a ``RuntimeError``) names the
parameter; the message's first line is self-contained (for a trainer's log). The check runs on
the device and gates the writes there, so ``step`` never waits for the device: the error is
raised by ``check_steps()`` (a trainer calls it where it synchronises anyway) or by a later
``step`` (at once on the CPU), and the steps in between write nothing either
(``gsgd_cli.optim.step_record``). ``strict=True`` waits for the check in every step and raises
at once.

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

from . import fused_cpu
from ._common import SGD_NEUTRAL, check_group_keys, unwrap_model
from .step_record import StepRecord
from .validation import check_lr

__all__ = ["PathSGD", "PathSGDStepError", "needs_input_shape"]

# Keys in the optimizer's param group / state (kept here: the project has no shared key module yet).
LR = "lr"
EPS = "eps"
RESCALE = "rescale"
RESCALE_RATIO = "rescale_ratio"
_RESCALE_CHOICES = (None, "first", "every")


INPUT_SHAPE = "input_shape"
MAXIMIZE = "maximize"
STATE_RECORD = "path_sgd"      # the structure record's key in state_dict()


class PathSGDStepError(RuntimeError):
    """A Path-SGD step that would divide 0/0 or write non-finite weights; nothing was written.
    `step` is the number of the failed `step()` call (1 = the first), `steps_after` the number of
    calls after it before the error was raised (they wrote nothing either)."""

    def __init__(self, message: str, step: int | None = None, steps_after: int = 0):
        super().__init__(message)
        self.step = step
        self.steps_after = steps_after


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
        strict: ``False`` (default): the guard runs on the device and a failed step is raised
            later (``check_steps()`` or the next ``step``); ``True``: every step waits for it.
        fused: ``None`` (default) / ``True``: on the CPU (float32/float64), the division, the
            guard and the update run in one kernel (``fused_cpu``: one read and one write pass
            per parameter); ``False``: always the tensor operations of ``step``. Same result.
        maximize: Path-SGD on ``-loss``, as ``torch.optim.SGD``'s flag.

    ``input_shape`` is fixed once built: in ``param_groups[0]`` for the record, recorded in
    ``state_dict()``, and a state saved with another one is refused. A step refuses param-group
    keys it would ignore (e.g. SGD's ``momentum=0.9`` from an SGD state_dict). Copies
    (``copy.deepcopy``, ``pickle``, ``torch.save(opt)``) keep their own squared-weight copy and
    step exactly like the original.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, *, rescale: Optional[str] = None,
                 eps: float = 0.0, input_shape: Optional[Sequence[int]] = None,
                 strict: bool = False, fused: Optional[bool] = None,
                 maximize: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}. Must be a torch.nn.Module "
                            "(PathSGD takes the model, not its parameters).")
        lr = check_lr(lr)
        eps = _check_number("eps", eps)
        if not (rescale is None or (isinstance(rescale, str) and rescale in _RESCALE_CHOICES)):
            raise ValueError(f"Invalid rescale={rescale!r}. Must be None, 'first' or 'every'.")
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize={maximize!r}. Must be True or False.")
        if strict not in (True, False):
            raise ValueError(f"Invalid strict={strict!r}. Must be True or False.")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused={fused!r}. Must be None, True or False.")
        self.strict = strict
        self.fused = fused
        self._native: Optional[fused_cpu.FusedPathStep] = None
        self._step_record: Optional[StepRecord] = None
        if input_shape is not None:
            if (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence)
                    or len(input_shape) == 0
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                               for s in input_shape)):
                raise ValueError(f"Invalid input_shape={input_shape!r}. Must be a non-empty "
                                 "sequence of positive integers (the input shape without the "
                                 "batch dimension).")
            input_shape = tuple(int(s) for s in input_shape)

        model = unwrap_model(model)    # torch.compile, DataParallel, DDP share the parameters
        named = list(model.named_parameters())
        if not named:
            raise ValueError("Invalid model: it has no parameters.")
        params = [p for _, p in named]
        self._param_names = [n for n, _ in named]

        # The private squared-weight copy: deep-copied once, eval mode, traced, pools squared.
        shadow = copy.deepcopy(model).eval()
        for p in shadow.parameters():
            p.requires_grad_(True)
        inferred = self._build_shadow(shadow)
        if input_shape is None:
            if inferred is None:
                raise ValueError(
                    "PathSGD needs input_shape for this model (its first layer is not an "
                    "nn.Linear reached by flatten/ReLU only, e.g. a conv net): pass "
                    "input_shape=(C, H, W), the shape of one input without the batch dimension; "
                    "kappa of a convolution depends on the image size.")
            input_shape = inferred
        self._input_shape = input_shape

        defaults = {LR: lr, EPS: eps, RESCALE: rescale, INPUT_SHAPE: input_shape,
                    MAXIMIZE: maximize}
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
    def _build_shadow(self, shadow: nn.Module) -> Optional[tuple]:
        """Trace the squared-weight copy `shadow` (a deep copy of the model; the traced module
        shares its parameters) and square its poolings; returns the inferred input shape."""
        gm = _trace(shadow)
        _, inferred = _check_and_square_pools(gm)
        self._shadow_model = shadow        # what copies of the optimizer rebuild from
        self._shadow = gm
        shadow_params = dict(gm.named_parameters())
        # Shadow parameter for each model parameter (None: not inside a Linear/Conv2d used in
        # forward; such a parameter may not receive a gradient).
        self._shadow_params: list[Optional[torch.Tensor]] = [
            shadow_params.get(n) for n in self._param_names]
        return inferred

    def _record(self) -> dict:
        return {INPUT_SHAPE: list(self._input_shape), "param_names": list(self._param_names)}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pathsgd_structure"] = {**self._record(), "shadow": self._shadow_model,
                                       "fused": self.fused, "strict": self.strict}
        return state

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("PathSGD keeps all parameters of its model in one param group; "
                             "add_param_group is not supported.")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        structure = state.pop("_pathsgd_structure", None)
        super().__setstate__(state)
        if structure is not None:            # a copy: deepcopy, pickle, torch.save(opt)
            self._param_names = list(structure["param_names"])
            self._input_shape = tuple(structure[INPUT_SHAPE])
            self._build_shadow(structure["shadow"])
            self.fused = structure["fused"]
            self.strict = structure["strict"]
            self._native = None
            self._step_record = None
        for group in self.param_groups:
            group.setdefault(EPS, 0.0)
            group.setdefault(RESCALE, None)
            group.setdefault(MAXIMIZE, False)
            group.setdefault(INPUT_SHAPE, self._input_shape)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state[STATE_RECORD] = self._record()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by `state_dict()`; refuses one saved with another input shape or
        for other parameters, and one from another optimizer."""
        record = state_dict.get(STATE_RECORD)
        groups = state_dict.get("param_groups") or [{}]
        if record is None and not {EPS, RESCALE} <= set(groups[0]):
            raise ValueError("this state_dict was not saved by PathSGD; PathSGD cannot use "
                             "another optimizer's state: start PathSGD afresh instead")
        if record is not None:
            saved = tuple(record[INPUT_SHAPE])
            if saved != self._input_shape:
                raise ValueError(f"the state_dict was saved by PathSGD with input_shape={saved}, "
                                 f"this PathSGD has input_shape={self._input_shape}: build it "
                                 f"with input_shape={saved} to load this state")
            for k, (a, b) in enumerate(zip(record["param_names"], self._param_names)):
                if a != b:
                    raise ValueError(f"the state_dict's parameter {k} is '{a}', this PathSGD's "
                                     f"is '{b}': load it into a PathSGD built on the same model")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_RECORD})

    def _check_group(self, group: dict) -> None:
        """Refuse param-group keys the step would ignore (SGD's momentum, nesterov, ...)."""
        check_group_keys("PathSGD", group, {LR, EPS, RESCALE, MAXIMIZE},
                         {**SGD_NEUTRAL, "momentum": (0, 0.0), "weight_decay": (0, 0.0)},
                         {INPUT_SHAPE: self._input_shape})


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
        self._check_group(group)
        params = group["params"]
        record = self._step_record_on(params[0].device)
        if record.visible_failure():
            raise self._step_error()
        lr, eps, rescale = group[LR], group[EPS], group[RESCALE]
        if group[MAXIMIZE]:
            lr = -lr                       # Path-SGD on -loss: the step's sign flips
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
            if self._fused_step(params, kappa_all, record, lr, eps, rescale):
                if self.strict:
                    self.check_steps()
                return loss
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
            # the guard on the device: per parameter (zero kappa with a gradient, update not
            # finite, gradient not finite); the writes are gated by it
            zero = torch.stack([((k == 0) & (g != 0)).sum() for k, g in zip(kappas, grads)])
            # lr * update must be finite (a NaN/inf lr set in the group, an overflow)
            bad_update = ~torch.isfinite(
                lr * torch.stack(torch._foreach_norm(updates, float("inf"))))
            bad_grad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
            flags = torch.stack([zero.to(torch.float64), bad_update.to(torch.float64),
                                 bad_grad.to(torch.float64)], dim=1)
            if len(idx) == len(params):
                diag = flags.reshape(-1)
            else:                          # rows of zeros for the parameters without a grad
                rows = dict(zip(idx, flags.unbind(0)))
                zeros = flags.new_zeros(3)
                diag = torch.cat([rows.get(i, zeros) for i in range(len(params))])
            ok = ((zero == 0).all() & ~bad_update.any())[None]
            gate = record.update(ok, diag)
            if self.strict:
                self.check_steps()
                gate = None
            else:
                updates = [torch.where(gate, u, 0.0) for u in updates]
            if rescale is not None:
                ratio = self._rescale_ratio(rescale, grads, updates, params[0], gate)
                torch._foreach_mul_(updates, ratio)
            if math.isfinite(lr):     # a NaN/inf lr (a host value) failed the check above;
                torch._foreach_add_(ps, updates, alpha=-lr)   # lr * (gated 0) would be NaN
        if not self.strict:
            record.publish()
        return loss

    def _fused_step(self, params, kappas, record: StepRecord, lr, eps, rescale) -> bool:
        """The division, guard and update in the fused CPU kernel; False when it does not
        apply (then the tensor operations run)."""
        if self.fused is False or record.device.type != "cpu":
            return False
        dtype = params[0].dtype
        if self._native is None:
            lib = (fused_cpu.library() if fused_cpu.FusedCPUStep.supports(list(params))
                   else None)
            if lib is None:
                self.fused = False
                return False
            self._native = fused_cpu.FusedPathStep(lib, list(params))
        ptrs = []
        for p, k in zip(params, kappas):
            g = p.grad
            if g is None:
                ptrs += [p.data_ptr(), 0, 0]
                continue
            if not (p.dtype == g.dtype == k.dtype == dtype and p.device.type == "cpu"
                    and g.is_contiguous() and k.is_contiguous() and p.is_contiguous()):
                return False
            ptrs += [p.data_ptr(), g.data_ptr(), k.data_ptr()]
        state = self.state[params[0]]
        ratio = None
        if rescale == "first":
            ratio = state.get(RESCALE_RATIO)
            if ratio is None or ratio.dtype != torch.float64 or ratio.device.type != "cpu":
                ratio = torch.full((), float("nan"), dtype=torch.float64) if ratio is None \
                    else ratio.detach().to("cpu", torch.float64).clone()
                state[RESCALE_RATIO] = ratio
        slot = ratio if ratio is not None else torch.zeros((), dtype=torch.float64)
        self._native(ptrs, lr, eps, rescale, slot, record.status, record.diag, dtype)
        return True

    def check_steps(self) -> None:
        """Raise ``PathSGDStepError`` if a step since the last check failed (waits for the
        device). The failed step and the steps after it wrote nothing; once raised, the record
        is cleared and later steps write again."""
        if self._step_record is not None and self._step_record.failed():
            raise self._step_error()

    def _step_record_on(self, device: torch.device) -> StepRecord:
        if self._step_record is None or self._step_record.device != device:
            self._step_record = StepRecord(device, 3 * len(self.param_groups[0]["params"]))
        return self._step_record

    def _rescale_ratio(self, rescale, grads, updates, first_param, gate) -> torch.Tensor:
        state = self.state[first_param]
        g2 = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum()
        u2 = torch.stack([torch.linalg.vector_norm(u) ** 2 for u in updates]).sum()
        ratio = torch.sqrt(g2 / u2)
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        if rescale == "first":
            # frozen at the first step that wrote (NaN until then), all on the device
            stored = state.get(RESCALE_RATIO)
            if stored is None:
                stored = torch.full_like(ratio, float("nan"))
            unset = torch.isnan(stored)
            ratio = torch.where(unset, ratio, stored)
            new = ratio if gate is None else torch.where(gate, ratio, stored)
            if RESCALE_RATIO in state:        # in place: a captured CUDA graph keeps using it
                stored.copy_(new)
            else:
                state[RESCALE_RATIO] = new
        return ratio

    def _step_error(self) -> PathSGDStepError:
        step, after, diag = self._step_record.take()
        params = self.param_groups[0]["params"]
        tail = ("" if after == 0 else
                f" (This was step {step}; the {after} step(s) after it wrote nothing either.)")
        for i, (name, p) in enumerate(zip(self._param_names, params)):
            n_zero, bad_update, bad_grad = diag[3 * i:3 * i + 3]
            shape = tuple(p.shape)
            if n_zero:
                return PathSGDStepError(
                    f"PathSGD: kappa is 0 but the gradient is not for {int(n_zero)} of "
                    f"{p.numel()} entries of parameter '{name}' {shape}: no path with non-zero "
                    "weights runs through them, so that gradient did not come from "
                    "backpropagating through this model. Check what sets .grad, or pass eps > 0 "
                    "to divide by kappa + eps (not exactly invariant)." + tail, step, after)
            if bad_update:
                lr = self.param_groups[0][LR]
                what = ("its gradient is not finite" if bad_grad else
                        f"lr * gradient / kappa is not finite (lr={lr:g}; or kappa under- or "
                        "overflows)")
                return PathSGDStepError(
                    f"PathSGD: non-finite update for parameter '{name}' {shape}: {what}. Lower "
                    "lr, check the loss for NaN/Inf, or train in float64; eps > 0 bounds the "
                    "step where kappa underflows." + tail, step, after)
        return PathSGDStepError(f"PathSGD step {step} failed." + tail, step, after)
