"""The closed-form G-SGD step of one chain block, vectorised per layer.

Notation (see `skeleton.py` for the layout and `../shared/notes/gsgd-math.md` section 3):

* `In[k][n]`: product of the skeleton weights on the chain from an input to node `n` of node
  layer `k`; `Out[k][n]`: the same from node `n` to an output. For a non-skeleton edge
  `e = (a -> b)` of weight layer `i` the other weights on its basis path multiply to
  `s_e = In[i][a] * Out[i+1][b]` (a bias is an edge from a constant unit with `In = 1`).
* `pi(e)`: the pivot on that path: `b` if `i < P`, `a` if `i > P`, none in the pivot layer
  (and none for biases of layers `i >= P`).
* pivot `j` has value `u_j`, its chain's free weights multiply to `t_j = In[P][j mod n_P] *
  Out[P+1][j]`, and its basis path value is `v_j = u_j t_j`.

One step with learning rate `lr` and weight gradients `dW` (Inverse-Chain-Rule, an SGD step on
the basis-path values, then Weight-Allocation with the free weights fixed):

    S_j   = sum over non-skeleton e with pi(e) = j of  w_e * dw_e
    g_j   = (u_j * du_j - S_j) / v_j                 # dLoss/dv_j of the all-skeleton path j
    u_j'  = u_j - lr * g_j / t_j,   R_j = u_j' / u_j
    w_e'  = (w_e - lr * dw_e / s_e**2) / R_pi(e)      # every non-skeleton edge (R = 1 if none)
    free weights unchanged

No Python loop runs over nodes or edges: each layer costs a few broadcast tensor operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .skeleton import ChainSkeleton


@dataclass
class ChainIndex:
    """The skeleton's index vectors on one device (built once, reused every step)."""

    flat: list[Tensor]
    rows: list[Tensor]
    cols: list[Tensor]

    @classmethod
    def build(cls, skeleton: ChainSkeleton, device: torch.device) -> "ChainIndex":
        return cls(
            flat=[layer.flat.to(device) for layer in skeleton.layers],
            rows=[layer.rows.to(device) for layer in skeleton.layers],
            cols=[layer.cols.to(device) for layer in skeleton.layers],
        )


def chain_products(skeleton: ChainSkeleton, index: ChainIndex,
                   skel_values: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """`In[k]` for node layers `0 .. L-1` and `Out[k]` for node layers `1 .. L` (index k)."""
    widths = skeleton.widths
    num_layers = len(skeleton.layers)
    ones = skel_values[0].new_ones
    ins: list[Tensor] = [ones(widths[0])]
    for i, layer in enumerate(skeleton.layers[:-1]):   # In of node layer i + 1
        n = widths[i + 1]
        if layer.role == "out":      # solid edge of node j is [j, j] (its own column)
            ins.append(skel_values[i][:n] * ins[i][:n])
        else:                        # one skeleton entry per row j: [j, j mod n_i]
            ins.append(skel_values[i] * ins[i][index.cols[i]])
    outs: list[Tensor | None] = [None] * (num_layers + 1)
    outs[num_layers] = ones(widths[-1])
    for i in range(num_layers - 1, 0, -1):              # Out of node layer i
        n = widths[i]
        if skeleton.layers[i].role == "out":   # one skeleton entry per column j: [j mod n, j]
            outs[i] = skel_values[i] * outs[i + 1][index.rows[i]]
        else:                                  # solid edge of node j is [j, j]
            outs[i] = skel_values[i][:n] * outs[i + 1][:n]
    return ins, outs  # type: ignore[return-value]


def _as_layer_view(t: Tensor, layer) -> Tensor:
    return t.reshape(layer.n_out, layer.n_in, layer.kernel)


def _gather(t: Tensor, flat: Tensor) -> Tensor:
    return t.reshape(-1).index_select(0, flat)


@dataclass
class ChainStep:
    """Result of one block step, computed out of place (nothing written yet)."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    pivot_ratio: Tensor       # R_j = u_j' / u_j


def chain_step(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
               biases: list[Tensor | None], grads: list[Tensor | None],
               bias_grads: list[Tensor | None], lr: float) -> ChainStep:
    """One exact G-SGD step of a chain block; returns new tensors, leaves the inputs alone.

    `weights[i]` has `n_{i+1} * n_i * K_i` elements (any shape with that layout, e.g. a Linear
    weight `[out, in]` or a conv weight `[out, in, kh, kw]`); a `None` gradient counts as zero.
    """
    pivot = skeleton.pivot_layer
    skel_values = [_gather(w, index.flat[i]) for i, w in enumerate(weights)]
    ins, outs = chain_products(skeleton, index, skel_values)

    # Inverse-Chain-Rule: S_j collects w * dw over the non-skeleton edges whose path has pivot j.
    pivot_sum = skel_values[pivot].new_zeros(skeleton.num_pivots)
    for i, layer in enumerate(skeleton.layers):
        if layer.role == "pivot":
            continue
        if grads[i] is not None:
            wg = _as_layer_view(weights[i] * grads[i], layer)
            skel_wg = _gather(wg, index.flat[i])
            if layer.role == "in":          # pivot = output node (row)
                pivot_sum[: layer.n_out] += wg.sum(dim=(1, 2)) - skel_wg
            else:                           # pivot = input node (column)
                pivot_sum[: layer.n_in] += wg.sum(dim=(0, 2)) - skel_wg
        if layer.role == "in" and biases[i] is not None and bias_grads[i] is not None:
            pivot_sum[: layer.n_out] += biases[i] * bias_grads[i]

    u = skel_values[pivot]
    du = (_gather(grads[pivot], index.flat[pivot]) if grads[pivot] is not None
          else torch.zeros_like(u))
    t = ins[pivot][index.cols[pivot]] * outs[pivot + 1]
    # u' = u - lr * (du - S/u) / t^2, written so that it needs no division by u.
    new_u = u - lr * (du - pivot_sum / u) / (t * t)
    ratio = new_u / u

    # Weight-Allocation: SGD on every non-skeleton edge's path value, then divide by R_pi(e).
    new_weights: list[Tensor] = []
    new_biases: list[Tensor | None] = []
    for i, layer in enumerate(skeleton.layers):
        w = _as_layer_view(weights[i], layer)
        row_scale = outs[i + 1].reciprocal().square()            # 1 / Out^2 per output node
        col_scale = ins[i].reciprocal().square()                 # 1 / In^2 per input node
        inv_r = None
        if layer.role == "in":
            inv_r = ratio[: layer.n_out].reciprocal()
            new_w = w * inv_r[:, None, None]
            grad_coef = (row_scale * inv_r)[:, None] * col_scale[None, :]
        elif layer.role == "out":
            inv_r = ratio[: layer.n_in].reciprocal()
            new_w = w * inv_r[None, :, None]
            grad_coef = row_scale[:, None] * (col_scale * inv_r)[None, :]
        else:
            new_w = w.clone()
            grad_coef = row_scale[:, None] * col_scale[None, :]
        if grads[i] is not None:
            new_w.addcmul_(_as_layer_view(grads[i], layer), grad_coef[:, :, None], value=-lr)
        flat_new = new_w.view(-1)
        if layer.role == "pivot":
            flat_new.index_copy_(0, index.flat[i], new_u)
        else:
            flat_new.index_copy_(0, index.flat[i], skel_values[i])
        new_weights.append(new_w.view_as(weights[i]))

        bias = biases[i]
        if bias is None:
            new_biases.append(None)
            continue
        new_b = bias * inv_r if layer.role == "in" else bias.clone()
        if bias_grads[i] is not None:
            coef = row_scale * inv_r if layer.role == "in" else row_scale
            new_b.addcmul_(bias_grads[i], coef, value=-lr)
        new_biases.append(new_b)
    return ChainStep(new_weights, new_biases, ratio)
