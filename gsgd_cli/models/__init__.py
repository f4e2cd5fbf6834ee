"""Models for the runner, and `build_model(model_cfg, in_shape, num_classes)` (a stable API)."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from .convnets import BasicBlock, PlainNet, ResNet
from .mlp import MLP

__all__ = ["MLP", "PlainNet", "ResNet", "BasicBlock", "build_model", "MODEL_NAMES"]

MODEL_NAMES = ("mlp", "plain", "resnet", "torchvision", "custom")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def build_model(model_cfg: Any, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model that `model_cfg` names for inputs of shape `in_shape` (C, H, W).

    `model_cfg.name` is `mlp` (keys `width`, `depth`, `bias`), `plain` or `resnet` (keys
    `blocks`, `widths`, `bn`), or `torchvision` (keys `arch`, `image_size`: any torchvision
    classification model, see `torchvision_models.py`), or `custom` (key `_target_`: any
    `nn.Module` by import path, see `custom.py`). Invalid values raise `ValueError` with
    the offending key.
    """
    name = _get(model_cfg, "name")
    if name == "mlp":
        return MLP(int(math.prod(in_shape)), num_classes, width=_get(model_cfg, "width", 64),
                   depth=_get(model_cfg, "depth", 2), bias=bool(_get(model_cfg, "bias", False)))
    if name in ("plain", "resnet"):
        if len(in_shape) != 3:
            raise ValueError(f"Invalid input shape {tuple(in_shape)} for model '{name}'. "
                             "Must be (channels, height, width).")
        cls = PlainNet if name == "plain" else ResNet
        kwargs = {k: list(_get(model_cfg, k)) for k in ("blocks", "widths")
                  if _get(model_cfg, k) is not None}
        return cls(in_shape[0], num_classes, bn=bool(_get(model_cfg, "bn", True)), **kwargs)
    if name == "torchvision":
        from .torchvision_models import build_torchvision

        image_size = _get(model_cfg, "image_size")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"Invalid model.image_size={image_size!r}. Must be a positive "
                             "integer or null.")
        return build_torchvision(str(_get(model_cfg, "arch")), tuple(in_shape), num_classes,
                                 image_size)
    if name == "custom":
        from .custom import build_custom

        return build_custom(model_cfg, tuple(in_shape), num_classes)
    raise ValueError(f"Invalid model.name={name!r}. Must be one of: {', '.join(MODEL_NAMES)} "
                     "(pick a preset with model=mlp, model=plain34, model=resnet34, model=torchvision, ...).")
