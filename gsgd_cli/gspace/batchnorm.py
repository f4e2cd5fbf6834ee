"""Batch norm after a chain layer (paper, eq. 39): the layer's weight gradient is multiplied,
per output channel, by the norm of that channel's incoming filter (`bn="approx"`), or with
`per_tap` by the norm over input channels at each kernel position (`bn="approx_per_tap"`, the
published code's norm)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

__all__ = ["scale_grads_for_bn"]


def scale_grads_for_bn(weights: Sequence[Tensor], grads: list[Tensor | None],
                       bn_after: Sequence[bool], per_tap: bool) -> None:
    """Replace `grads[i]` (new tensors, `.grad` untouched) for each layer `i` followed by
    batch norm."""
    for i, follows in enumerate(bn_after):
        if follows and grads[i] is not None:
            w = weights[i]
            if per_tap and w.dim() > 2:
                norms = w.norm(dim=1, keepdim=True)            # [out, 1, kh, kw]
            else:
                norms = w.reshape(w.shape[0], -1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
            grads[i] = grads[i] * norms
