"""A seeded random classification task of any image shape, for tests and benchmarks.

Each class has a random prototype image; samples are the prototype plus Gaussian noise,
quantised to uint8 like real images, so the same device-resident pipeline applies. The task
depends only on `data.seed`, not on the training seed.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from gsgd_cli.errors import UserError

from .common import cfg_get

MAX_VALUES = 1 << 31   # bytes of uint8 images (2 GiB; generated in float32, 4x that)


def synthetic_shape(cfg: Any) -> tuple[tuple[int, int, int], int]:
    shape = cfg_get(cfg, "shape", (1, 8, 8))
    shape = tuple(shape)
    num_classes = cfg_get(cfg, "num_classes", 10)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise UserError(f"Invalid data.shape={list(shape)}. Must be three positive integers "
                        "[channels, height, width], e.g. data.shape=[3,32,32].")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"Invalid data.num_classes={num_classes!r}. Must be an integer >= 2.")
    return shape, num_classes


def make_synthetic(cfg: Any):
    shape, num_classes = synthetic_shape(cfg)
    sizes = {k: cfg_get(cfg, k, d) for k, d in (("train_size", 1024), ("test_size", 256))}
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"Invalid data.{key}={value!r}. Must be a positive integer.")
    noise = cfg_get(cfg, "noise", 0.25)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1e6:
        raise UserError(f"Invalid data.noise={noise!r}. Must be a finite number >= 0.")
    values = (sizes["train_size"] + sizes["test_size"]) * math.prod(shape)
    if values > MAX_VALUES:
        raise UserError(f"data.shape={list(shape)} with {sizes['train_size']} + "
                        f"{sizes['test_size']} examples would take {values / 2**30:.1f} GiB; "
                        f"keep it under {MAX_VALUES / 2**30:.0f} GiB (smaller shape or sizes).")
    gen = torch.Generator().manual_seed(int(cfg_get(cfg, "seed", 0)))
    prototypes = torch.rand((num_classes, *shape), generator=gen)
    out = []
    for n in (sizes["train_size"], sizes["test_size"]):
        y = torch.randint(num_classes, (n,), generator=gen)
        x = prototypes[y] + noise * torch.randn((n, *shape), generator=gen)
        out += [(x.clamp(0, 1) * 255).round().to(torch.uint8), y]
    return tuple(out)
