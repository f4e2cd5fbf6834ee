r"""Path-SGD's math as functions of tensor lists: kappa from the squared-weight copy, the update
``lr * g / kappa`` with its guard, and the optional rescaling ratio (rule and notation in
`gsgd_cli.optim.path_sgd`). The optimizer class gathers the tensors and calls these in order:
`kappa` -> `plan_update` -> (gate by the step record) -> `rescale_ratio` -> `apply_update`;
the fused CPU kernel (`gsgd_cli.optim.native.path_sgd_step`) does the last three in one pass."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import fx

__all__ = ["kappa", "plan_update", "rescale_ratio", "apply_update"]


def kappa(copy: fx.GraphModule, used: Sequence[int], params: Sequence[torch.Tensor],
          input_shape: tuple) -> list[Optional[torch.Tensor]]:
    """kappa for each of `params` (None for a parameter on no path, i.e. not in `used`).

    `copy` is the squared-weight copy reading its weights from its second input
    (`squared_copy.take_squared_weights`, which gave `used`). One pass squares the weights,
    then one forward of an all-ones input of shape ``(1, *input_shape)`` and one backward of
    the summed output give d phi(w)^2 / d(w^2) for every edge at once (a matrix-vector product
    per layer each way, the weight gradients as outer products): no model copy is written."""
    with torch.no_grad():
        src = [params[i].detach() for i in used]
        squared = torch._foreach_mul(src, src)
    for s in squared:
        s.requires_grad_(True)
    ref = params[0]
    ones = torch.ones((1, *input_shape), device=ref.device, dtype=ref.dtype)
    with torch.enable_grad():
        out = copy(ones, squared)
        if not isinstance(out, torch.Tensor):
            raise TypeError("the model's forward must return one tensor")
        grads = torch.autograd.grad(out.sum(), squared, allow_unused=True)
    result: list[Optional[torch.Tensor]] = [None] * len(params)
    for i, s, g in zip(used, squared, grads):
        result[i] = torch.zeros_like(s) if g is None else g.detach()
    return result


def plan_update(grads: list[torch.Tensor], kappas: list[torch.Tensor], lr: float, eps: float,
                idx: list[int], n_params: int):
    """The updates ``g / (kappa + eps)`` of the parameters `idx` (of `n_params`), and the guard:
    ``ok`` (a 1-element bool tensor: the step may write) and ``diag`` (3 numbers per parameter:
    entries with zero kappa but a gradient, update not finite, gradient not finite)."""
    if eps:
        kappas = torch._foreach_add(kappas, eps)
    # kappa_e = 0 means every path through e has another zero weight (or e meets only
    # zero padding), and then dL/dw_e = 0 too: such a weight's step is 0, not 0/0.
    # A zero kappa with a non-zero gradient cannot come from backprop: it is an error.
    updates = [g / torch.where(k == 0, torch.ones_like(k), k) for g, k in zip(grads, kappas)]
    zero = torch.stack([((k == 0) & (g != 0)).sum() for k, g in zip(kappas, grads)])
    # lr * update must be finite (a NaN/inf lr set in the group, an overflow)
    bad_update = ~torch.isfinite(lr * torch.stack(torch._foreach_norm(updates, float("inf"))))
    bad_grad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
    flags = torch.stack([zero.to(torch.float64), bad_update.to(torch.float64),
                         bad_grad.to(torch.float64)], dim=1)
    if len(idx) == n_params:
        diag = flags.reshape(-1)
    else:                          # rows of zeros for the parameters without a grad
        rows = dict(zip(idx, flags.unbind(0)))
        zeros = flags.new_zeros(3)
        diag = torch.cat([rows.get(i, zeros) for i in range(n_params)])
    ok = ((zero == 0).all() & ~bad_update.any())[None]
    return updates, ok, diag


def rescale_ratio(rescale: str, grads: list[torch.Tensor], updates: list[torch.Tensor],
                  stored: Optional[torch.Tensor], gate: Optional[torch.Tensor]):
    """``rho = ||g|| / ||g / kappa||`` (1 where not finite), and the ratio to store: for
    ``rescale='first'`` the one frozen at the first step that wrote (`stored`, NaN until then;
    `gate` False keeps it), for ``'every'`` None. Returns (ratio to apply, ratio to store)."""
    g2 = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum()
    u2 = torch.stack([torch.linalg.vector_norm(u) ** 2 for u in updates]).sum()
    ratio = torch.sqrt(g2 / u2)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    if rescale != "first":
        return ratio, None
    if stored is None:
        stored = torch.full_like(ratio, float("nan"))
    ratio = torch.where(torch.isnan(stored), ratio, stored)
    new = ratio if gate is None else torch.where(gate, ratio, stored)
    return ratio, new


def apply_update(params: list[torch.Tensor], updates: list[torch.Tensor], lr: float) -> None:
    """``w <- w - lr * update`` (a NaN/inf lr, a host value, already failed the guard:
    lr * (gated 0) would be NaN, so nothing is written then)."""
    if math.isfinite(lr):
        torch._foreach_add_(params, updates, alpha=-lr)
