"""G-Adam's and G-RMSprop's fused CPU kernel (`gadam_step.cpp`): `available` says whether it can
run a model's parameters, `run_kernel` calls it on the blocks' description. The step around it
(the blocks' tensors and state, the outside parameters, the record) is
`optim/adaptive_fused.fused_step`, the twin of `adaptive_eager.eager_step`;
`tests/optim/test_gadam_fused.py` checks the two against each other.

Layout (see `gadam_step.cpp`): `desc` = [blocks, then per block: active, layers, pivot layer,
then per layer role, n_out, n_in, kernel, centre, has_bias]; `ptrs` = per layer of an active
block: w, dw, b, db, the weight's three state tensors, the bias's three (0: none); `opts` =
[rmsprop, lr, beta1 or alpha, beta2, eps, weight_decay, bpr, min_pivot_ratio, amsgrad,
centered, momentum, outside gradients finite, then per block 1 - beta1^t, sqrt(1 - beta2^t)];
`diag`: G-SGD's layout per block (`optim/gsgd_diag.py`)."""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .build import declare, library, supports

__all__ = ["ROLES", "available", "run_kernel"]

ROLES = {"in": 0, "pivot": 1, "out": 2}

for _name in ("gadam_step_f32", "gadam_step_f64"):
    declare(_name, ctypes.c_int64, [ctypes.c_void_p] * 4 + [ctypes.c_int])


def available(tensors: list[Tensor]) -> bool:
    """The kernel can run these parameters: float32/float64 contiguous CPU tensors, built."""
    return bool(tensors) and supports(tensors) and library() is not None


def run_kernel(desc: list[int], ptrs: list[int], opts: list[float], diag: Tensor,
               dtype: torch.dtype) -> bool:
    """Run the kernel; True if it wrote the step (every check passed)."""
    c_desc = (ctypes.c_int64 * len(desc))(*desc)
    c_ptrs = (ctypes.c_int64 * max(len(ptrs), 1))(*ptrs)
    c_opts = (ctypes.c_double * len(opts))(*opts)
    function = library().gadam_step_f32 if dtype == torch.float32 else library().gadam_step_f64
    return bool(function(ctypes.addressof(c_desc), ctypes.addressof(c_ptrs),
                         ctypes.addressof(c_opts), diag.data_ptr(), torch.get_num_threads()))
