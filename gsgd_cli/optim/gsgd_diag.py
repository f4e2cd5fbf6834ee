"""The diag of a G-SGD step: what the device check writes (per block of n layers, 3n + 3
values: n "weight gradient not finite", n "bias gradient not finite", "a pivot failed", the
first failed pivot, its ratio, then n "update not finite"; then one "gradient not finite" per
parameter outside the blocks) and the one-line error decoded from it. The fused kernel writes
the same layout (`native/gsgd.py`, `native/gsgd_step.cpp`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..gspace.update import StepOptions, pivot_ratio_ok
from .errors import GSGDStepError, StepError
from .gsgd_blocks import BlockPlan

__all__ = ["diagnose", "outside_check", "step_error"]


def diagnose(plans: list[BlockPlan], planned: list, outside: list[Tensor], options: StepOptions,
             device: torch.device) -> tuple[Tensor, Tensor]:
    """(all checks passed, diag) on the device, without waiting for it (the layout above)."""
    oks, pieces = [], []
    for plan, item in zip(plans, planned):
        num_layers = len(plan.weights)
        if item is None:
            pieces.append(torch.zeros(3 * num_layers + 3, dtype=torch.float64,
                                      device=device))
            continue
        step = item[2]
        ratio = step.pivot_ratio
        bad = ~pivot_ratio_ok(ratio, options.min_ratio)
        first = bad.to(torch.uint8).argmax()
        pieces += [t.to(torch.float64) for t in (
            ~torch.isfinite(step.grad_max), ~torch.isfinite(step.bias_max), bad.any()[None],
            first[None], ratio.index_select(0, first[None]), ~torch.isfinite(step.bounds))]
        oks.append(step.ok())
    return close_diag(oks, pieces, outside, device)


def close_diag(oks: list[Tensor], pieces: list[Tensor], outside: list[Tensor],
               device: torch.device) -> tuple[Tensor, Tensor]:
    """Append the outside parameters' check to a step's block checks: (ok of the whole step,
    shape (1,); the diag, the blocks' pieces then one flag per outside parameter)."""
    outside_ok, flags = outside_check(outside, device)
    if outside_ok is not None:
        oks.append(outside_ok)
    pieces.append(flags)
    ok = torch.stack(oks).all() if oks else torch.ones((), dtype=torch.bool, device=device)
    return ok[None], torch.cat(pieces)


def outside_check(outside: list[Tensor], device: torch.device) -> tuple[Tensor | None, Tensor]:
    """(all gradients finite, or None when none is present; one float64 flag per parameter
    outside the blocks: "its gradient is not finite"), on the device."""
    grads = [p.grad for p in outside]
    present = [g for g in grads if g is not None]
    if not present:
        return None, torch.zeros(len(grads), dtype=torch.float64, device=device)
    finite = iter(torch.isfinite(torch.stack(torch._foreach_norm(present, float("inf")))))
    bad = torch.stack([~next(finite) if g is not None
                       else torch.zeros((), dtype=torch.bool, device=device) for g in grads])
    return ~bad.any(), bad.to(torch.float64)


def step_error(step: int, after: int, diag, plans: list[BlockPlan], outside: list[Tensor],
               names: dict[int, str], lr: float, min_ratio: float, *,
               error_cls: type[StepError] = GSGDStepError, label: str = "G-SGD",
               outside_rule: str = "plain SGD") -> StepError:
    """The failure recorded in `diag` (host values) as one `error_cls` naming the layer:
    a non-finite gradient first, then a vanished pivot, then a non-finite update.
    `names`: parameter name by id; `label`: the step's name ("G-SGD step 3 failed in ...");
    `outside_rule`: the step taken outside the blocks. The adaptive G-space optimizers write
    the same layout (`adaptive_eager.diagnose`)."""
    advice = f"lower the learning rate (lr={lr:g}) or check the inputs and loss"
    nothing = ("Nothing was updated." if after == 0 else
               f"Nothing was updated by it or by the {after} step(s) after it (the "
               f"weights are those before step {step}).")
    where = f"{label} step {step} failed in"
    at, sections = 0, []
    for plan in plans:
        n = len(plan.weights)
        sections.append((plan, diag[at:at + 3 * n + 3]))
        at += 3 * n + 3
    outside_flags = diag[at:]

    def error(message):
        return error_cls(message, step, after)

    for plan, d in sections:          # a non-finite gradient first, in any block
        n = len(plan.weights)
        for k, name in enumerate(plan.block.names * 2):
            if d[k]:
                what = "its gradient" if k < n else "its bias gradient"
                return error(f"{where} layer '{name}': {what} is not finite; {advice}. "
                             f"{nothing}")
    for p, flag in zip(outside, outside_flags):
        if flag:
            return error(f"{where} parameter '{names.get(id(p), '?')}' ({outside_rule} "
                         f"step outside the chain blocks): its gradient is not finite; "
                         f"{advice}. {nothing}")
    for plan, d in sections:
        n = len(plan.weights)
        if d[2 * n]:
            name = plan.block.names[plan.skeleton.pivot_layer]
            return error(f"{where} layer '{name}': pivot {int(d[2 * n + 1])} would change by "
                         f"the ratio {d[2 * n + 2]:.3g} (to 0, not finite or below "
                         f"min_pivot_ratio={min_ratio:g}); {advice}. {nothing}")
        for name, flag in zip(plan.block.names, d[2 * n + 3:]):
            if flag:
                return error(f"{where} layer '{name}': the update is not finite; {advice}. "
                             f"{nothing}")
    return error(f"{label} step {step} failed; {advice}. {nothing}")
