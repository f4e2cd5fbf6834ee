"""Can a block's G-SGD steps be represented in the parameters' dtype? Checked at construction.

A G-SGD step (`update.py`) moves a non-skeleton weight `e = (a -> b)` of layer `i` by
`lr * dw_e / s_e^2` with `s_e = In[i][a] * Out[i+1][b]`, products of skeleton weights along
the chains, and divides by the all-skeleton path values `v_j`. In a deep block with skeleton
weights far from 1 (`skeleton_init="keep"` or `"rescale"` on a He-initialised network) these
products span more orders of magnitude than float32 holds: `1/s^2` overflows, or `s^2` and `v`
underflow to 0, and every step fails whatever the learning rate. `step_range` measures this
from the skeleton values alone (float64, no data needed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .skeleton import ChainSkeleton
from .update import ChainIndex, chain_products


@dataclass
class StepRange:
    """log10 of the extremes over one block: path products `s`, coefficients `1/s^2`."""

    s_min: float
    s_max: float
    coefficient_max: float       # log10 of the largest 1/s^2 (and 1/v_j^2 of the pivots' paths)
    coefficient_min: float

    def problem(self, dtype: torch.dtype) -> str | None:
        """Why a step cannot be represented in `dtype` (None: it can)."""
        info = torch.finfo(dtype)
        top, bottom = math.log10(info.max), math.log10(info.tiny)
        if self.coefficient_max > top or self.s_min < bottom / 2:
            return (f"the coefficients 1/s^2 reach 1e{self.coefficient_max:.0f}, beyond "
                    f"{str(dtype).replace('torch.', '')} (largest {info.max:.1e}): every step "
                    "overflows, whatever the learning rate")
        if self.coefficient_min < bottom or self.s_max > top / 2:
            return (f"the coefficients 1/s^2 fall to 1e{self.coefficient_min:.0f}, below "
                    f"{str(dtype).replace('torch.', '')}'s smallest normal number "
                    f"({info.tiny:.1e}): those weights cannot move")
        return None


def _log10_abs(t: Tensor) -> Tensor:
    return t.abs().log10()


def step_range(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor]) -> StepRange:
    """The range of a block's step coefficients at the current skeleton values."""
    values = [w.detach().reshape(-1).index_select(0, flat).double()
              for w, flat in zip(weights, index.flat)]
    ins, outs = chain_products(skeleton, index, values)
    num_layers = len(skeleton.layers)
    s_lo, s_hi, c_lo, c_hi = [], [], [], []
    for i in range(num_layers):
        log_in, log_out = _log10_abs(ins[i]), _log10_abs(outs[i + 1])
        lo = log_in.min() + log_out.min()
        hi = log_in.max() + log_out.max()
        s_lo.append(torch.minimum(lo, log_out.min()))      # a bias edge has In = 1
        s_hi.append(torch.maximum(hi, log_out.max()))
    pivot = skeleton.pivot_layer
    v = (_log10_abs(values[pivot]) + _log10_abs(ins[pivot])[index.cols[pivot]]
         + _log10_abs(outs[pivot + 1]))                       # all-skeleton path values
    low = torch.minimum(torch.stack(s_lo).min(), v.min())
    high = torch.maximum(torch.stack(s_hi).max(), v.max())
    clean = [float(x) if math.isfinite(float(x)) else (-400.0 if float(x) < 0 else 400.0)
             for x in (low, high)]
    return StepRange(clean[0], clean[1], -2 * clean[0], -2 * clean[1])
