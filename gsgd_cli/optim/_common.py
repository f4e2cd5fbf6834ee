"""Plumbing shared by GSGD and PathSGD: wrapped models and the keys of their param group."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

# Keys that torch's LR schedulers and SWA write into a param group for their own bookkeeping.
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum",
                            "swa_lr", "param_names"})

# torch.optim.SGD's flags, e.g. from an SGD state_dict loaded into the group: accepted only with
# the values that describe what these optimizers do anyway (the first value is the advice).
SGD_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "nesterov": (False,),
    "dampening": (0, 0.0),
    "differentiable": (False,),
    "fused": (None, False),
    "foreach": (None, False, True),     # an implementation choice; the result is the same
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile(...)`, `nn.DataParallel` and `DistributedDataParallel`
    wrappers (nested in any order). A wrapper shares its parameters with the model it wraps, so
    an optimizer built on the inner model trains the wrapped one."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):      # torch.compile
            model = model._orig_mod
        else:
            return model


def check_group_keys(owner: str, group: dict, own: set[str] | frozenset[str],
                     neutral: dict[str, tuple[Any, ...]], fixed: dict[str, Any]) -> None:
    """Refuse param-group keys that this optimizer would ignore (raises ValueError).

    `own`: the keys the optimizer reads every step; `neutral`: other optimizers' flags, allowed
    with the listed values only; `fixed`: options that act at construction and must keep the
    value they had then."""
    for key, value in group.items():
        if key == "params" or key in own or key in fixed or key in SCHEDULER_KEYS:
            continue
        if key in neutral:
            if any(value is v or (type(value) is type(v) and value == v)
                   or (isinstance(value, (int, float)) and not isinstance(value, bool)
                       and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and value == v) for v in neutral[key]):
                continue
            raise ValueError(f"{owner} does not support {key}={value!r} (found in "
                             f"param_groups[0]); set it to {neutral[key][0]!r} or delete the key")
        raise ValueError(f"{owner} does not use param_groups[0][{key!r}] (= {value!r}) and would "
                         f"ignore it; delete the key (del opt.param_groups[0][{key!r}])")
    for key in own:            # read every step: a NaN/inf set here would reach the weights
        value = group.get(key)
        if isinstance(value, float) and not math.isfinite(value):   # ints are finite
            raise ValueError(f"{owner}: param_groups[0][{key!r}] = {value!r} is not a finite "
                             "number; set a finite value. Nothing was updated.")
    for key, value in fixed.items():
        if key in group and group[key] != value:
            raise ValueError(f"{owner}'s {key} is fixed when it is built ({key}={value!r}); "
                             f"param_groups[0][{key!r}] = {group[key]!r} would be ignored: "
                             f"build a new {owner} with {key}={group[key]!r} instead")
