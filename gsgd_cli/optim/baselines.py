"""torch's Adam and RMSprop behind the runner's optimizer convention (the model first), the
weight-space baselines of GAdam and GRMSprop (`conf/optimizer/adam.yaml`, `rmsprop.yaml`)."""
from __future__ import annotations

import torch
from torch import nn

from .validation import check_betas, check_flag, check_lr, check_nonnegative

__all__ = ["make_adam", "make_rmsprop"]


def make_adam(model: nn.Module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Adam:
    """`torch.optim.Adam(model.parameters(), ...)`, the arguments checked first."""
    return torch.optim.Adam(model.parameters(), lr=check_lr(lr), betas=check_betas(betas),
                            eps=check_nonnegative("eps", eps),
                            weight_decay=check_nonnegative("weight_decay", weight_decay),
                            amsgrad=check_flag("amsgrad", amsgrad))


def make_rmsprop(model: nn.Module, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> torch.optim.RMSprop:
    """`torch.optim.RMSprop(model.parameters(), ...)`, the arguments checked first."""
    return torch.optim.RMSprop(model.parameters(), lr=check_lr(lr),
                               alpha=check_nonnegative("alpha", alpha),
                               eps=check_nonnegative("eps", eps),
                               weight_decay=check_nonnegative("weight_decay", weight_decay),
                               momentum=check_nonnegative("momentum", momentum, below=1),
                               centered=check_flag("centered", centered))
