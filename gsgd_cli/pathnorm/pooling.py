"""Average pooling with squared coefficients, for the squared-weight copy: a pooling output is
``sum_i c_i x_i`` with fixed ``c_i`` (e.g. 1/k^2); a path through it must carry ``c_i^2``, so
each pooling of the copy multiplies its output by its per-position coefficient once more."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SquaredAvgPool2d", "SquaredAdaptiveAvgPool2d", "sq_avg_pool2d",
           "sq_adaptive_avg_pool2d", "sq_mean"]


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


class SquaredAvgPool2d(nn.Module):
    """``AvgPool2d`` whose coefficients are squared: output * (1 / divisor)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self._coef = _avg_pool2d_coef(kwargs)

    def forward(self, x):
        return F.avg_pool2d(x, **self.kwargs) * self._coef(x)


class SquaredAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` whose coefficients are squared: output * (1 / window size)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size
        self._coef = _adaptive_avg_pool2d_coef()

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, self.output_size)
        return y * self._coef(x, y)


def sq_avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None):
    kwargs = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad, divisor_override=divisor_override)
    return F.avg_pool2d(x, **kwargs) * _avg_pool2d_coef(kwargs)(x)


def sq_adaptive_avg_pool2d(x, output_size):
    y = F.adaptive_avg_pool2d(x, output_size)
    return y * _adaptive_avg_pool2d_coef()(x, y)


def sq_mean(x, *args, **kwargs):
    """``mean`` with its coefficient 1/N squared (N = number of averaged entries)."""
    if "dtype" in kwargs:
        raise ValueError("PathSGD: mean(..., dtype=...) is not supported")
    y = torch.mean(x, *args, **kwargs)
    return y * (y.numel() / x.numel())
