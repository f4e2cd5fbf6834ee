"""The two helpers every data loader shares: reading a data-config field and checking labels.

Kept apart from `datasets.py` so that the loaders it dispatches to (`cifar.py`, `synthetic.py`)
import this module, not their dispatcher: no import circle in `gsgd_cli.data`.
"""
from __future__ import annotations

from typing import Any

import torch

from gsgd_cli.errors import UserError


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for dicts, DictConfigs and simple objects; `default` when absent or null."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def check_labels(y: torch.Tensor, num_classes: int, source: Any, fix: str) -> None:
    """Labels must lie in [0, num_classes): a wrong one would fail only later, mid-training."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UserError(f"{source} holds label {bad}, outside 0..{num_classes - 1} "
                        f"({num_classes} classes); {fix}.")
