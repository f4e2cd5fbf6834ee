"""G-Adam's and G-RMSprop's fused CPU step (`gadam_step.cpp`): `fused_step` has the signature
of the eager step (`adaptive_eager.eager_step`) and does the same for every chain block in one
kernel call (three passes per layer: sums, check, write); the parameters outside the blocks
take torch's own step afterwards, as in the eager step. `tests/optim/test_gadam_fused.py`
checks the two against each other."""
from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from ...gspace.adaptive import AdamOptions, RMSpropOptions
from ..adaptive_eager import STATE_KEYS, block_step_count, commit_step_counts, outside_step
from ..gsgd_diag import outside_check
from .build import declare, library, supports

__all__ = ["fused_step", "available"]

ROLES = {"in": 0, "pivot": 1, "out": 2}

for _name in ("gadam_step_f32", "gadam_step_f64"):
    declare(_name, ctypes.c_int64, [ctypes.c_void_p] * 4 + [ctypes.c_int])


def available(tensors: list[Tensor]) -> bool:
    """The kernel can run these parameters: float32/float64 contiguous CPU tensors, built."""
    return bool(tensors) and supports(tensors) and library() is not None


def _state_tensors(state, p: Tensor, keys: tuple[str, ...], pending: list):
    """The state tensors of `p` under `keys` (None: that slot is unused); missing ones are made
    as zeros and kept in `pending` to enter `state` only if the step is written."""
    found = []
    for key in keys:
        if key is None:
            found.append(None)
            continue
        tensor = state.get(p, {}).get(key)
        if tensor is None:
            tensor = torch.zeros_like(p, memory_format=torch.contiguous_format)
            pending.append((p, key, tensor))
        found.append(tensor)
    return found


def fused_step(plans, state, options: AdamOptions | RMSpropOptions, maximize: bool,
               min_ratio: float, outside: list[Tensor], record) -> bool | None:
    """The whole step in the kernel (blocks) and torch's functional step (outside). Returns
    whether it was written, or None when the kernel cannot take these tensors (the caller runs
    the eager step instead). The check and its record are as in the eager step."""
    rmsprop = isinstance(options, RMSpropOptions)
    keys = STATE_KEYS["rmsprop" if rmsprop else "adam"](options)
    desc, ptrs, opts_tail, keep, pending, active_plans = [len(plans)], [], [], [], [], []
    dtype = None
    for plan in plans:
        weights, biases, grads, bias_grads = plan.tensors(maximize)
        active = any(g is not None for g in grads + bias_grads)
        n = len(weights)
        desc += [int(active), n, plan.skeleton.pivot_layer]
        for layer, b in zip(plan.skeleton.layers, biases):
            desc += [ROLES[layer.role], layer.n_out, layer.n_in, layer.kernel, layer.centre,
                     int(b is not None)]
        step = block_step_count(state, plan) + 1
        if isinstance(options, AdamOptions):
            beta1, beta2 = options.betas
            opts_tail += [1 - beta1 ** step, math.sqrt(1 - beta2 ** step)]
        else:
            opts_tail += [1.0, 1.0]
        if not active:
            continue
        active_plans.append((plan, step))
        tensors = []
        for i, (w, b, g, gb) in enumerate(zip(weights, biases, grads, bias_grads)):
            if w.data_ptr() != plan.weights[i].data_ptr():
                return None                      # a non-contiguous weight: the eager step
            ws = _state_tensors(state, plan.weights[i], keys, pending)
            bs = (_state_tensors(state, plan.biases[i], keys, pending) if b is not None
                  else [None] * 3)
            row = [w, g, b, gb, *ws, *bs]
            tensors += [t for t in row if t is not None]
            ptrs += [0 if t is None else t.data_ptr() for t in row]
        if not supports(tensors):
            return None
        dtype = dtype or tensors[0].dtype
        if tensors[0].dtype != dtype:
            return None
        keep.append(tensors)
    device = record.device
    outside_ok, flags = outside_check(outside, device)
    outside_fine = outside_ok is None or bool(outside_ok)
    diag = torch.zeros(sum(3 * len(p.weights) + 3 for p in plans), dtype=torch.float64)
    written = True
    if dtype is not None:
        if rmsprop:
            rule = [1.0, options.lr, options.alpha, 0.0, options.eps, options.weight_decay,
                    options.bpr, min_ratio, 0.0, float(options.centered), options.momentum]
        else:
            rule = [0.0, options.lr, *options.betas, options.eps, options.weight_decay,
                    options.bpr, min_ratio, float(options.amsgrad), 0.0, 0.0]
        c_desc = (ctypes.c_int64 * len(desc))(*desc)
        c_ptrs = (ctypes.c_int64 * max(len(ptrs), 1))(*ptrs)
        all_opts = rule + [float(outside_fine)] + opts_tail
        c_opts = (ctypes.c_double * len(all_opts))(*all_opts)
        function = (library().gadam_step_f32 if dtype == torch.float32
                    else library().gadam_step_f64)
        written = bool(function(ctypes.addressof(c_desc), ctypes.addressof(c_ptrs),
                                ctypes.addressof(c_opts), diag.data_ptr(),
                                torch.get_num_threads()))
    written = written and outside_fine
    ok = torch.tensor([written], device=device)
    gate = record.update(ok, torch.cat([diag.to(device), flags]))
    if not bool(gate):
        return False
    for p, key, tensor in pending:
        state[p][key] = tensor
    commit_step_counts(state, active_plans)
    outside_step(outside, state, options, maximize)
    return True
