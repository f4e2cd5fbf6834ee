"""G-Adam's and G-RMSprop's fused step (the kernel of `native/gadam.py` for the blocks, torch's
functional step outside them), with the signature of the eager step
(`adaptive_eager.eager_step`) and the same result, checks and record."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gspace.adaptive import AdamOptions, RMSpropOptions
from .adaptive_eager import STATE_KEYS, block_step_count, commit_step_counts, outside_step
from .gsgd_diag import outside_check
from .native.build import supports
from .native.gadam import ROLES, run_kernel

__all__ = ["fused_step"]


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
        written = run_kernel(desc, ptrs, rule + [float(outside_fine)] + opts_tail, diag, dtype)
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
