"""G-Adam's and G-RMSprop's eager step as functions of the blocks' tensors (the math is
`gsgd_cli.gspace.adaptive`): `plan_all` computes every block's new weights, biases and moments
out of place (nothing written), `diagnose` checks them in G-SGD's diag layout
(`gsgd_diag`), `apply_all` writes them, `outside_step` gives the parameters outside every
block torch's own Adam / RMSprop step (`torch.optim.adam.adam`, `torch.optim.rmsprop.rmsprop`).

State, as torch keeps it: `state[p]` holds tensors shaped like `p` (`exp_avg`, `exp_avg_sq`,
`max_exp_avg_sq` for Adam; `square_avg`, `grad_avg`, `momentum_buffer` for RMSprop) and the
step count `step` (a 0-dim tensor). In a block an entry holds the state of a basis path: a
non-skeleton entry that of its edge's path, a pivot entry that of the pivot's all-skeleton
path; the free skeleton weights' entries stay 0. All parameters of a block share one step
count (the block's)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.rmsprop import rmsprop as torch_rmsprop

from ..gspace.adaptive import AdamOptions, RMSpropOptions, chain_adaptive_step
from ..gspace.update import ChainIndex, pivot_ratio_ok
from .gsgd_blocks import BlockPlan
from .gsgd_diag import close_diag

__all__ = ["eager_step", "plan_all", "diagnose", "apply_all", "outside_step", "diag_size",
           "STATE_KEYS", "block_step_count", "commit_step_counts"]

# The state tensors of a coordinate, by rule: the names torch uses (None: a slot not in use).
STATE_KEYS = {
    "adam": lambda o: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if o.amsgrad else None),
    "rmsprop": lambda o: ("square_avg", "grad_avg" if o.centered else None,
                          "momentum_buffer" if o.momentum > 0 else None),
}


@dataclass
class PlannedBlock:
    """One block's step, computed and not written."""

    plan: BlockPlan
    index: ChainIndex
    grads: list[Tensor | None]         # the gradients the step used (batch-norm scaled)
    bias_grads: list[Tensor | None]
    weights: list[Tensor]              # before the step (contiguous)
    new_weights: list[Tensor]
    new_biases: list[Tensor | None]
    new_state: dict                    # ("w" | "b", layer) -> {name: tensor}
    step: int                          # the block's step count after this step


def diag_size(plans: list[BlockPlan], num_outside: int) -> int:
    """G-SGD's diag layout (`gsgd_diag`): 3n + 3 values per block of n layers, then one flag
    per parameter outside the blocks."""
    return sum(3 * len(plan.weights) + 3 for plan in plans) + num_outside


def block_step_count(state, plan: BlockPlan) -> int:
    """The block's step count (0 before its first step)."""
    step = state.get(plan.weights[0], {}).get("step")
    return 0 if step is None else int(step)


def _block_state(state, plan: BlockPlan) -> dict:
    found = {}
    for kind, params in (("w", plan.weights), ("b", plan.biases)):
        for i, p in enumerate(params):
            if p is not None and p in state:
                found[kind, i] = {k: v for k, v in state[p].items() if k != "step"}
    return found


def plan_all(plans: list[BlockPlan], state, options: AdamOptions | RMSpropOptions,
             maximize: bool) -> list[PlannedBlock | None]:
    """Every block's step, computed out of place (None for a block without gradients)."""
    options = replace(options, maximize=False)     # `tensors(maximize)` negates the grads
    planned = []
    for plan in plans:
        weights, biases, grads, bias_grads = plan.tensors(maximize)
        if all(g is None for g in grads + bias_grads):
            planned.append(None)
            continue
        index = plan.index_on(weights[0].device)
        step = block_step_count(state, plan) + 1
        new_weights, new_biases, new_state = chain_adaptive_step(
            plan.skeleton, index, weights, biases, grads, bias_grads,
            _block_state(state, plan), step, options)
        planned.append(PlannedBlock(plan, index, grads, bias_grads, weights, new_weights,
                                    new_biases, new_state, step))
    return planned


def _not_finite(tensors, device: torch.device) -> Tensor:
    """One bool on `device`: some tensor in `tensors` (None skipped) has a NaN or inf."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros((), dtype=torch.bool, device=device)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(present, float("inf")))).all()


def diagnose(plans: list[BlockPlan], planned: list, outside: list[Tensor], min_ratio: float,
             device: torch.device) -> tuple[Tensor, Tensor]:
    """(all checks passed, diag) in G-SGD's layout: per block of n layers, n "weight gradient
    not finite", n "bias gradient not finite", "a pivot failed", the first failed pivot, its
    ratio, n "update not finite" (new weight, bias or moments); then one "gradient not
    finite" per parameter outside the blocks."""
    oks, pieces = [], []
    for plan, item in zip(plans, planned):
        n = len(plan.weights)
        if item is None:
            pieces.append(torch.zeros(3 * n + 3, dtype=torch.float64, device=device))
            continue
        pivot = plan.skeleton.pivot_layer
        flat = item.index.flat[pivot]
        ratio = (item.new_weights[pivot].reshape(-1).index_select(0, flat)
                 / item.weights[pivot].reshape(-1).index_select(0, flat))
        bad_pivot = ~pivot_ratio_ok(ratio, min_ratio)
        first = bad_pivot.to(torch.uint8).argmax()
        grad_bad = torch.stack([_not_finite([g], device) for g in item.grads])
        bias_bad = torch.stack([_not_finite([g], device) for g in item.bias_grads])
        update_bad = torch.stack([_not_finite([item.new_weights[i], item.new_biases[i],
                                               *item.new_state.get(("w", i), {}).values(),
                                               *item.new_state.get(("b", i), {}).values()],
                                              device)
                                  for i in range(n)])
        pieces += [t.to(device=device, dtype=torch.float64) for t in (
            grad_bad, bias_bad, bad_pivot.any()[None], first[None],
            ratio.index_select(0, first[None]), update_bad)]
        oks.append(~(grad_bad.any() | bias_bad.any() | bad_pivot.any() | update_bad.any()))
    return close_diag(oks, pieces, outside, device)


def _step_tensor(step: int) -> Tensor:
    return torch.tensor(float(step), dtype=_get_scalar_dtype())


def commit_step_counts(state, stepped: list[tuple[BlockPlan, int]]) -> None:
    """Record each stepped block's step count in the state of every parameter of it."""
    for plan, step in stepped:
        for p in plan.params:
            state[p]["step"] = _step_tensor(step)


def eager_step(plans: list[BlockPlan], state, options: AdamOptions | RMSpropOptions,
               maximize: bool, min_ratio: float, outside: list[Tensor], record) -> bool:
    """The whole step: plan every block, check (recorded in `record`, a StepRecord), and only
    if every check passed write the blocks and give the outside parameters torch's step.
    Returns whether it was written (the fused kernel's `native.gadam.fused_step` is its twin)."""
    planned = plan_all(plans, state, options, maximize)
    gate = record.update(*diagnose(plans, planned, outside, min_ratio, record.device))
    if not bool(gate):      # the host decides: it keeps the step count of the bias correction
        return False
    apply_all(planned, state)
    outside_step(outside, state, options, maximize)
    return True


def apply_all(planned: list, state) -> None:
    """Write the planned steps: weights and biases in place, the moments into `state`."""
    for item in planned:
        if item is None:
            continue
        plan = item.plan
        for kind, params, new in (("w", plan.weights, item.new_weights),
                                  ("b", plan.biases, item.new_biases)):
            for i, p in enumerate(params):
                if p is None:
                    continue
                p.detach().copy_(new[i])
                own = state[p]
                for name, value in item.new_state[kind, i].items():
                    if name in own:
                        own[name].copy_(value)      # in place: the state keeps its tensors
                    else:
                        own[name] = value.reshape(p.shape).clone(
                            memory_format=torch.contiguous_format)
        commit_step_counts(state, [(plan, item.step)])


def _state_tensor(state: dict, name: str, p: Tensor) -> Tensor:
    if name not in state:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state[name]


def outside_step(outside: list[Tensor], state, options: AdamOptions | RMSpropOptions,
                 maximize: bool) -> None:
    """torch's own Adam / RMSprop step (its functional form, the same hyper-parameters) for
    the parameters outside every block that have a gradient."""
    params = [p for p in outside if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    for p in params:
        if "step" not in state[p]:
            state[p]["step"] = torch.zeros((), dtype=_get_scalar_dtype())
    steps = [state[p]["step"] for p in params]
    if isinstance(options, AdamOptions):
        beta1, beta2 = options.betas
        torch_adam(params, grads, [_state_tensor(state[p], "exp_avg", p) for p in params],
                   [_state_tensor(state[p], "exp_avg_sq", p) for p in params],
                   [_state_tensor(state[p], "max_exp_avg_sq", p) for p in params]
                   if options.amsgrad else [], steps, amsgrad=options.amsgrad, beta1=beta1,
                   beta2=beta2, lr=options.lr, weight_decay=options.weight_decay,
                   eps=options.eps, maximize=maximize)
        return
    torch_rmsprop(params, grads, [_state_tensor(state[p], "square_avg", p) for p in params],
                  [_state_tensor(state[p], "grad_avg", p) for p in params]
                  if options.centered else [],
                  [_state_tensor(state[p], "momentum_buffer", p) for p in params]
                  if options.momentum > 0 else [], steps, maximize=maximize, lr=options.lr,
                  alpha=options.alpha, eps=options.eps, weight_decay=options.weight_decay,
                  momentum=options.momentum, centered=options.centered)
