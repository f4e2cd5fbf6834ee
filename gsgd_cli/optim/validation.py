"""Argument checks shared by the optimizers, so that SGD, G-SGD and Path-SGD reject the same
bad values with the same message (`Invalid lr='abc'. Must be a finite number > 0.`)."""
from __future__ import annotations

import math
import numbers
from typing import Sequence


def check_lr(value) -> float:
    """A learning rate: a finite real number > 0 (not a bool, a string, nan or inf)."""
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid lr={value!r}. Must be a finite number > 0.")
    return float(value)


def check_nonnegative(name: str, value, below: float | None = None) -> float:
    """A finite real number >= 0 (and < `below` when given), e.g. momentum or weight decay."""
    if not _real(value) or not math.isfinite(value) or value < 0 or (
            below is not None and value >= below):
        bound = f"in [0, {below:g})" if below is not None else ">= 0"
        raise ValueError(f"Invalid {name}={value!r}. Must be a finite number {bound}.")
    return float(value)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_input_shape(input_shape) -> tuple[int, ...] | None:
    """None, or one input's shape without the batch dimension: positive integers."""
    if input_shape is None:
        return None
    if (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence)
            or not input_shape or not all(isinstance(n, int) and not isinstance(n, bool)
                                          and n > 0 for n in input_shape)):
        raise ValueError(f"Invalid input_shape={input_shape!r}. Must be a non-empty sequence of "
                         "positive integers (the input shape without the batch dimension).")
    return tuple(int(n) for n in input_shape)



def check_betas(value) -> tuple[float, float]:
    """Adam's `betas`: two finite numbers in [0, 1)."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or not all(_real(b) and math.isfinite(b) and 0 <= b < 1 for b in value)):
        raise ValueError(f"Invalid betas={value!r}. Must be two finite numbers in [0, 1).")
    return float(value[0]), float(value[1])


def check_flag(name: str, value) -> bool:
    """True or False (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}. Must be True or False.")
    return value
