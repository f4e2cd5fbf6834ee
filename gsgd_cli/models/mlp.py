"""Fully connected ReLU network `[d : width x depth : classes]` (paper section 5.2 and 5.3)."""
from __future__ import annotations

import math

from torch import nn


class MLP(nn.Sequential):
    """`Flatten -> (Linear -> ReLU) x depth -> Linear`.

    Weights use He (Kaiming) normal initialisation as in the paper (its reference [7]); biases,
    when enabled, start at zero. The paper's MLPs have no biases (its Table 5 counts none), so
    `bias=False` is the default.
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 64, depth: int = 2,
                 bias: bool = False):
        for name, value in (("in_features", in_features), ("num_classes", num_classes),
                            ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid MLP {name}={value!r}. Must be a positive integer.")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"Invalid MLP depth={depth!r}. Must be an integer >= 0 "
                             "(the number of hidden layers).")
        widths = [in_features] + [width] * depth + [num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out, bias=bias)
            nn.init.normal_(linear.weight, std=math.sqrt(2.0 / fan_in))
            if bias:
                nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < depth:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths = widths
