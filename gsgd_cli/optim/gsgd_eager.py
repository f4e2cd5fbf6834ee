"""G-SGD's eager step as functions of the blocks' tensors (the readable path; its math is
`gsgd_cli.gspace.update`): `plan_all` computes every block's step and writes nothing,
`gsgd_diag.diagnose` checks them on the device, `apply_all` writes them gated by that check,
`sgd_outside` gives the parameters outside every block torch.optim.SGD's step. The fused CPU
kernel (`gsgd_fused.fused_step`) does the same in one call."""
from __future__ import annotations

import torch
from torch import Tensor

from ..gspace.update import StepOptions, apply_chain_step, plan_chain_step
from .gsgd_blocks import BlockPlan, momentum_buffer

__all__ = ["plan_all", "apply_all", "sgd_outside"]


def plan_all(plans: list[BlockPlan], state, options: StepOptions, maximize: bool) -> list:
    """Every block's step, computed and not written (None for a block without gradients)."""
    planned = []
    for plan in plans:
        tensors = plan.tensors(maximize)
        if all(g is None for g in tensors[2] + tensors[3]):
            planned.append(None)
            continue
        index = plan.index_on(plan.weights[0].device)
        pivot_state = state[plan.weights[plan.skeleton.pivot_layer]]
        step = plan_chain_step(plan.skeleton, index, *tensors, options,
                               pivot_state.get("pivot_momentum_buffer"), plan.workspace)
        planned.append((plan, index, step, tensors))
    return planned


def apply_all(planned: list, state, options: StepOptions, gate: Tensor | None) -> None:
    """Write the planned steps (gated by `gate` on the device; None: ungated)."""
    for item in planned:
        if item is None:
            continue
        plan, index, step, tensors = item
        buffers = bias_buffers = None
        if options.momentum:
            buffers = [momentum_buffer(state, w) for w in plan.weights]
            bias_buffers = [momentum_buffer(state, b) if b is not None else None
                            for b in plan.biases]
            pivot_state = state[plan.weights[plan.skeleton.pivot_layer]]
            old = pivot_state.get("pivot_momentum_buffer")
            if old is None:
                old = pivot_state["pivot_momentum_buffer"] = torch.zeros_like(
                    step.pivot_buffer)       # = the buffer "before the first step"
            # in place, so that a captured CUDA graph keeps updating the same tensor
            old.copy_(step.pivot_buffer if gate is None
                      else torch.where(gate, step.pivot_buffer, old))
        apply_chain_step(plan.skeleton, index, step, *tensors, options, buffers,
                         bias_buffers, plan.workspace, gate)
        plan.write_back(tensors[0])


def sgd_outside(outside: list[Tensor], state, options: StepOptions, maximize: bool,
                gate: Tensor | None = None) -> None:
    """torch.optim.SGD's step (momentum, weight decay) for parameters outside blocks."""
    params = [p for p in outside if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    if maximize:
        grads = torch._foreach_neg(grads)
    if options.weight_decay:
        grads = torch._foreach_add(grads, params, alpha=options.weight_decay)
    if gate is not None:
        grads = [torch.where(gate, g, 0.0) for g in grads]
    if options.momentum:
        buffers = [momentum_buffer(state, p) for p in params]
        mu = options.momentum
        if gate is not None:
            mu = torch.where(gate, torch.full((), mu, dtype=params[0].dtype,
                                              device=gate.device), 1.0)
        torch._foreach_mul_(buffers, mu)
        torch._foreach_add_(buffers, grads)
        grads = (buffers if gate is None       # a failed step keeps the buffers (mu -> 1,
                 else [torch.where(gate, b, 0.0) for b in buffers])  # dw -> 0) and must not
    torch._foreach_add_(params, grads, alpha=-options.lr)          # step along them either
