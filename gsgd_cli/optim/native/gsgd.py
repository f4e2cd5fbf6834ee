"""G-SGD's fused CPU step (`gsgd_step.cpp`): the description of the blocks for the kernel
(`FusedCPUStep`), and `fused_step`, which packs the pointers and calls it. The kernel does a
whole G-SGD step (every chain block and the plain-SGD parameters outside them) in one call:
one read pass per layer for the per-node sums, the largest |dw| and the finiteness checks, the
per-node vectors in short loops over the nodes, then, only if every check passed, one write
pass per layer. The formulas are those of `gsgd_cli.gspace.update` (the readable reference);
`tests/optim/test_fused_step.py` checks the two against each other and against the brute-force
reference.

Record layout (float64 tensors owned by the optimizer):
* `status = [calls, failed_at]`: the kernel adds 1 to `calls` on every call; the first call
  whose checks fail writes nothing and sets `failed_at = calls`; while `failed_at != 0` every
  call writes nothing (the caller raises and then resets it).
* `diag` (zeroed by the caller): for each block with L layers, `L` flags "dw of layer i is not
  finite", `L` flags for the bias gradients, then `pivot bad, pivot index, ratio`, then `L`
  flags "the update of layer i could overflow"; after all blocks, one flag per outside
  parameter "its gradient is not finite".
"""
from __future__ import annotations

import ctypes
import warnings
from typing import Callable

import torch
from torch import Tensor

from .build import declare, library, supports

__all__ = ["FusedCPUStep", "diag_size", "fused_step"]

ROLES = {"in": 0, "pivot": 1, "out": 2}
PTRS_PER_LAYER = 6

for _name in ("gsgd_step_f32", "gsgd_step_f64"):
    declare(_name, ctypes.c_int64, [ctypes.c_void_p] * 5 + [ctypes.c_int])


def diag_size(layer_counts: list[int], num_outside: int) -> int:
    return sum(3 * n + 3 for n in layer_counts) + num_outside


class FusedCPUStep:
    """The static description of an optimizer's blocks for the kernel, and the call."""

    def __init__(self, lib: ctypes.CDLL, plans, outside: list[torch.Tensor], per_tap: bool):
        self._functions = {torch.float32: lib.gsgd_step_f32, torch.float64: lib.gsgd_step_f64}
        desc = [len(plans)]
        for plan in plans:
            skeleton = plan.skeleton
            desc += [len(skeleton.layers), skeleton.pivot_layer]
            for layer, bn in zip(skeleton.layers, plan.block.bn_after):
                desc += [ROLES[layer.role], layer.n_out, layer.n_in, layer.kernel, layer.centre,
                         int(bool(bn) and not per_tap)]
        desc += [len(outside)] + [p.numel() for p in outside]
        self._desc = (ctypes.c_int64 * len(desc))(*desc)
        self._num_ptrs = (sum(PTRS_PER_LAYER * len(plan.weights) + 1 for plan in plans)
                          + 3 * len(outside))
        self._ptrs = (ctypes.c_int64 * self._num_ptrs)()
        self._opts = (ctypes.c_double * 5)()
        self._addresses = [ctypes.addressof(self._desc), ctypes.addressof(self._ptrs),
                           ctypes.addressof(self._opts)]
        self.per_tap = per_tap

    def __call__(self, pointers: list[int], options, status: torch.Tensor, diag: torch.Tensor,
                 dtype: torch.dtype) -> int:
        """Run the kernel: `pointers` are the data pointers laid out as `desc` says (0 for a
        missing tensor); `status` and `diag` are the record's (see the module docstring)."""
        self._ptrs[:] = pointers
        self._opts[:] = (options.lr, options.momentum, options.weight_decay, options.bpr,
                         options.min_ratio)
        return self._functions[dtype](*self._addresses, status.data_ptr(), diag.data_ptr(), torch.get_num_threads())


def fused_step(opt, options, record, maximize: bool, buffer: Callable[[Tensor], Tensor]) -> bool:
    """Run the whole step of `opt` (a GSGD: its plans, outside parameters, state, `fused` flag,
    `_native` cache) in the kernel; False when it does not apply (the caller then runs the
    eager step). `options`: a `gspace.update.StepOptions`; `record`: the step record;
    `buffer(p)`: p's momentum buffer. `maximize`: the gradients are negated in place around
    the kernel call (exact), so the step is the one on -loss."""
    if opt.fused is False:
        return False
    if record.device.type != "cpu":
        if opt.fused is True:
            opt.fused = None                 # warn once
            warnings.warn(f"GSGD(fused=True): the fused step runs on the CPU only; on "
                          f"{record.device.type} the eager step is used (capture the "
                          "training step in a CUDA graph to avoid its launch costs, e.g. "
                          "gsgd train train.cuda_graphs=true)", RuntimeWarning,
                          stacklevel=4)   # the caller of opt.step()
        return False
    if opt._native is None:
        tensors = [t for plan in opt._plans for t in (*plan.weights, *plan.biases)
                   if t is not None] + opt._outside
        lib = library() if supports(tensors) else None
        if lib is None:
            opt.fused = False
            return False
        opt._native = FusedCPUStep(lib, opt._plans, opt._outside,
                                              opt._structure["bn"] == "approx_per_tap")
        opt._native_dtype = tensors[0].dtype
    elif opt._plans and opt._plans[0].weights[0].dtype != opt._native_dtype:
        return False                  # the model was cast after the first step
    dtype = opt._native_dtype
    mu = options.momentum
    keep, ptrs = [], []               # keep: temporaries alive until the kernel returns
    direct = []                       # the .grad tensors the kernel reads as they are
    for plan in opt._plans:
        if not all(w.is_contiguous() for w in plan.weights):
            return False                  # e.g. channels_last: the eager step copies
        grads = [w.grad for w in plan.weights]
        bias_grads = [None if b is None else b.grad for b in plan.biases]
        active = mu and any(g is not None for g in grads + bias_grads)
        if plan.per_tap:              # scaled copies (of -grad with maximize)
            grads = plan.tensors(maximize)[2]
        else:
            direct += [g for g in grads if g is not None]
        direct += [g for g in bias_grads if g is not None]
        for w, b, g, gb in zip(plan.weights, plan.biases, grads, bias_grads):
            for t in (g, gb):
                if t is not None and not (t.dtype == dtype and t.is_contiguous()
                                          and t.device.type == "cpu"):
                    return False
            ptrs += [w.data_ptr(), 0 if g is None else g.data_ptr(),
                     0 if b is None else b.data_ptr(), 0 if gb is None else gb.data_ptr(),
                     buffer(w).data_ptr() if active else 0,
                     buffer(b).data_ptr() if active and b is not None else 0]
        if active:
            pivot = plan.weights[plan.skeleton.pivot_layer]
            if "pivot_momentum_buffer" not in opt.state[pivot]:
                opt.state[pivot]["pivot_momentum_buffer"] = pivot.new_zeros(
                    plan.skeleton.num_pivots)
            ptrs.append(opt.state[pivot]["pivot_momentum_buffer"].data_ptr())
        else:
            ptrs.append(0)
        keep.append(grads)
    for p in opt._outside:
        g = p.grad
        if g is not None and not (g.dtype == dtype and g.is_contiguous()
                                  and g.device.type == "cpu"):
            return False
        ptrs += [p.data_ptr(), 0 if g is None else g.data_ptr(),
                 buffer(p).data_ptr() if mu and g is not None else 0]
        if g is not None:
            direct.append(g)
    if not maximize:
        opt._native(ptrs, options, record.status, record.diag, dtype)
        return True
    torch._foreach_neg_(direct)       # the gradients of -loss, exactly
    try:
        opt._native(ptrs, options, record.status, record.diag, dtype)
    finally:
        torch._foreach_neg_(direct)
    return True
