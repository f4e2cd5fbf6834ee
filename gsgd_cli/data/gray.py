"""Colour images as one grey channel (`data.grayscale=true`).

The paper's Figure 5 (appendix 11.7) feeds MNIST and CIFAR-10 to an MLP as "input images of
gray scale"; this is that conversion for CIFAR. Each pixel becomes its luma with the ITU-R
BT.601 weights 0.299 R + 0.587 G + 0.114 B (the weights PIL's `convert("L")` and torchvision's
`rgb_to_grayscale` use), rounded to the nearest integer, so the images stay uint8 and the rest
of the pipeline (scaling to [0, 1], normalisation) is unchanged. One-channel images (MNIST,
Fashion-MNIST) are already grey and pass through.
"""
from __future__ import annotations

from typing import Any

import torch

from gsgd_cli.errors import UserError

from .common import cfg_get

LUMA_PER_MILLE = (299, 587, 114)   # BT.601 weights x 1000: integer arithmetic, exact rounding
CHUNK = 8192                       # images converted at a time (bounds the int32 temporaries)


def grayscale(data_cfg: Any) -> bool:
    """`data.grayscale` (default false); anything but true/false is one clear error."""
    value = cfg_get(data_cfg, "grayscale", False)
    if not isinstance(value, bool):
        raise UserError(f"Invalid data.grayscale={value!r}. Must be true (colour images become "
                        "one grey channel, as the paper's Figure 5) or false.")
    return value


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` -> uint8 `[N, 1, H, W]`: round(0.299 R + 0.587 G + 0.114 B).
    `[N, 1, H, W]` is returned as it is."""
    if x.shape[1] == 1:
        return x
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"to_gray needs uint8 images [N, 3, H, W], got {x.dtype} "
                         f"{list(x.shape)}")
    out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.uint8, device=x.device)
    for start in range(0, x.shape[0], CHUNK):
        part = x[start:start + CHUNK].to(torch.int32)
        luma = sum(w * part[:, c:c + 1] for c, w in enumerate(LUMA_PER_MILLE))
        out[start:start + CHUNK] = torch.div(luma + 500, 1000, rounding_mode="floor")
    return out


def pixel_stats(x: torch.Tensor) -> tuple[tuple[float], tuple[float]]:
    """Mean and std of one-channel uint8 images on the [0, 1] scale (the grey images'
    `data.normalize=standard` constants, from the training split)."""
    counts = torch.bincount(x.reshape(-1).to(torch.int64), minlength=256).to(torch.float64)
    levels = torch.arange(256, dtype=torch.float64) / 255.0     # from counts: no float copy
    n = counts.sum()
    mean = (counts * levels).sum() / n
    var = (counts * (levels - mean) ** 2).sum() / (n - 1)
    return (float(mean),), (float(var.sqrt()),)
