"""G-SGD's fused CPU step: packs the blocks' pointers for the kernel (`fused_cpu.FusedCPUStep`,
`native/fused_steps.cpp`) and calls it; False when it does not apply (then the eager step
runs). The choice is made here, once per step, from the optimizer's `fused` flag, the device,
the dtype and the layout of the tensors."""
from __future__ import annotations

import warnings

import torch

from ..gspace.update import StepOptions
from . import fused_cpu
from .gsgd_blocks import momentum_buffer
from .step_record import StepRecord

__all__ = ["fused_step"]


def fused_step(opt, options: StepOptions, record: StepRecord, maximize: bool) -> bool:
    """Run the whole step in the fused CPU kernel; False when it does not apply.
    `maximize`: the gradients are negated in place around the kernel call (exact), so the
    step is the one on -loss."""
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
        lib = fused_cpu.library() if fused_cpu.FusedCPUStep.supports(tensors) else None
        if lib is None:
            opt.fused = False
            return False
        opt._native = fused_cpu.FusedCPUStep(lib, opt._plans, opt._outside,
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
                     momentum_buffer(opt.state, w).data_ptr() if active else 0,
                     momentum_buffer(opt.state, b).data_ptr() if active and b is not None else 0]
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
                 momentum_buffer(opt.state, p).data_ptr() if mu and g is not None else 0]
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
