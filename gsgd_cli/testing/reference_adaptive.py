"""Brute-force G-Adam and G-RMSprop for tiny ReLU MLPs, in float64: the yardstick for the
closed form (`gsgd_cli/gspace/adaptive.py`, whose docstring states the rule).

Built on the G-SGD reference (`gsgd_cli/testing/gsgd_reference.py`: every path enumerated, the
skeleton rebuilt node by node): the basis-path gradient solves the Inverse-Chain-Rule rows of
the non-free weights densely (eq. 4), Adam's / RMSprop's rule moves the basis-path values, and
Weight-Allocation solves eq. (6) densely with the free weights' ratios fixed at 1. No code is
shared with `skeleton.py` / `update.py` / `adaptive.chain_gradient`; only the elementwise
rules (`adam_rule`, `rmsprop_rule`, checked against torch.optim by the tests) are.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..gspace.adaptive import AdamOptions, RMSpropOptions, adam_rule, rmsprop_rule
from .gsgd_reference import Basis, Net, path_values, skeleton_basis


def _path_jacobian(w: Tensor, basis: Basis) -> Tensor:
    """dv_p / dw_e (m x #basis paths): the product of the other weights on p."""
    jac = torch.zeros(w.numel(), len(basis.paths), dtype=torch.float64)
    for p, path in enumerate(basis.paths):
        for e in path:
            others = [f for f in path if f != e]
            jac[e, p] = torch.prod(w[others]) if others else 1.0
    return jac


def basis_gradient(net: Net, weight_grad: Tensor, basis: Basis) -> Tensor:
    """dL/dv for every basis path: eq. (4) restricted to the non-free weights, solved densely."""
    w = net.flat()
    jac = _path_jacobian(w, basis)
    free = set(basis.free)
    rows = [e for e in range(w.numel()) if e not in free]
    return torch.linalg.solve(jac[rows], weight_grad.to(torch.float64)[rows])


def allocate(net: Net, basis: Basis, new_values: Tensor) -> Net:
    """Eq. (6): the weights whose basis paths take `new_values`, free weights unchanged."""
    w = net.flat()
    m = w.numel()
    ratio = new_values / path_values(net, basis)
    a_tilde = torch.zeros(m, m, dtype=torch.float64)
    for col, e in enumerate(basis.free):
        a_tilde[e, col] = 1.0
    for p, path in enumerate(basis.paths):
        a_tilde[list(path), len(basis.free) + p] = 1.0
    inverse = torch.linalg.inv(a_tilde)
    assert torch.allclose(inverse, inverse.round(), atol=1e-9), "A~ is not unimodular"
    inverse = inverse.round()
    zeros = torch.zeros(len(basis.free), dtype=torch.float64)
    log_r = torch.cat([zeros, ratio.abs().log()]) @ inverse
    negative = torch.remainder(torch.cat([zeros, (ratio < 0).double()]) @ inverse, 2.0) > 0.5
    return net.unflat(w * torch.where(negative, -1.0, 1.0) * log_r.exp())


def _objective_gradient(net: Net, weight_grad: Tensor, weight_decay: float,
                        maximize: bool) -> Tensor:
    g = weight_grad.to(torch.float64)
    g = -g if maximize else g
    return g + weight_decay * net.flat()          # coupled L2 on every weight and bias


def _add_bpr(g: Tensor, net: Net, basis: Basis, bpr: float) -> Tensor:
    """+ the basis-path gradient of `ref.bpr_value`: 2 bpr log|v| / v on all-skeleton paths,
    2 bpr v on the others."""
    if not bpr:
        return g
    values = path_values(net, basis)
    skeleton = set(basis.free) | set(basis.pivots)
    all_skeleton = torch.tensor([set(path) <= skeleton for path in basis.paths])
    return g + 2 * bpr * torch.where(all_skeleton, values.abs().log() / values, values)


def gadam_step(net: Net, weight_grad: Tensor, state: dict, step: int, options: AdamOptions,
               basis: Basis | None = None) -> tuple[Net, dict]:
    """One G-Adam step (`step` counts from 1): `(new net, new state)`; state is per basis path."""
    basis = basis or skeleton_basis(net)
    g = basis_gradient(net, _objective_gradient(net, weight_grad, options.weight_decay,
                                                options.maximize), basis)
    g = _add_bpr(g, net, basis, options.bpr)
    decrement, new_state = adam_rule(g, state, step, options)
    return allocate(net, basis, path_values(net, basis) - decrement), new_state


def grmsprop_step(net: Net, weight_grad: Tensor, state: dict, options: RMSpropOptions,
                  basis: Basis | None = None) -> tuple[Net, dict]:
    """One G-RMSprop step: `(new net, new state)`; state is per basis path."""
    basis = basis or skeleton_basis(net)
    g = basis_gradient(net, _objective_gradient(net, weight_grad, options.weight_decay,
                                                options.maximize), basis)
    g = _add_bpr(g, net, basis, options.bpr)
    decrement, new_state = rmsprop_rule(g, state, options)
    return allocate(net, basis, path_values(net, basis) - decrement), new_state
