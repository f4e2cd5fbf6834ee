"""Plain SGD behind the runner's optimizer convention: a factory taking the model first."""
from __future__ import annotations

import torch
from torch import nn

from .validation import check_lr, check_nonnegative


def make_sgd(model: nn.Module, lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0) -> torch.optim.SGD:
    """`torch.optim.SGD(model.parameters(), lr, momentum, weight_decay)`.

    All optimizers in `conf/optimizer/` take the model (not its parameters) as first argument,
    because G-SGD and Path-SGD need the network's structure; this keeps SGD interchangeable.
    """
    return torch.optim.SGD(model.parameters(), lr=check_lr(lr),
                           momentum=check_nonnegative("momentum", momentum, below=1),
                           weight_decay=check_nonnegative("weight_decay", weight_decay))
