"""`model=custom model._target_=pkg.module.Class`: any `nn.Module` by import path.

Hydra's convention: `_target_` names a class or function, the other keys of the model config
are its keyword arguments (`+model.width=128`). The runner's own facts are passed where the
constructor takes them and the config does not set them: the input shape under
`input_shape`/`in_shape` (a (C, H, W) tuple), `in_channels`, `in_features` (C*H*W), and the
class count under `num_classes`/`n_classes`/`classes`/`out_features`.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

from torch import nn

RESERVED = ("name", "_target_")
SHAPE_KEYS = ("input_shape", "in_shape")
CLASS_KEYS = ("num_classes", "n_classes", "classes", "out_features")


def import_target(path: Any) -> Callable[..., Any]:
    """The object at dotted `path` (`pkg.module.Name`), or ValueError naming what is missing."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"Invalid model._target_={path!r}. Must be an import path such as "
                         "my_pkg.nets.MyNet (gsgd train model=custom model._target_=...).")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model._target_={path}: cannot import {module_name} ({exc}); check the "
                         "name and that its package is on PYTHONPATH.") from None
    if not hasattr(module, attr):
        raise ValueError(f"model._target_={path}: {module_name} has no {attr!r}.")
    target = getattr(module, attr)
    if not callable(target):
        raise ValueError(f"model._target_={path} is a {type(target).__name__}, not a class or "
                         "function that builds an nn.Module.")
    return target


def _accepts(target: Callable[..., Any]) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def runner_kwargs(target: Callable[..., Any], given: dict[str, Any],
                  in_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """What the runner adds for `target`'s parameters named in the module docstring."""
    names, _ = _accepts(target)
    facts = {key: tuple(in_shape) for key in SHAPE_KEYS}
    facts.update({key: num_classes for key in CLASS_KEYS})
    facts["in_channels"] = in_shape[0]
    facts["in_features"] = int(math.prod(in_shape))
    return {k: v for k, v in facts.items() if k in names and k not in given}


def build_custom(model_cfg: Any, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    cfg = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(vars(model_cfg))
    target = import_target(cfg.get("_target_"))
    given = {k: v for k, v in cfg.items() if k not in RESERVED}
    try:
        from omegaconf import OmegaConf

        given = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                 for k, v in given.items()}
    except ImportError:
        pass
    kwargs = {**given, **runner_kwargs(target, given, in_shape, num_classes)}
    try:
        model = target(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model._target_={cfg['_target_']}: {exc} (pass its arguments as "
                         f"+model.NAME=VALUE)") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={cfg['_target_']} returned a "
                         f"{type(model).__name__}, not a torch.nn.Module.")
    return model
