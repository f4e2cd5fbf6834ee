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
class LayerUpdate:
    """What one weight layer needs to apply its step in place."""

    weight_scale: Tensor | None     # 1/R per row ("in") or column ("out"); None: pivot layer
    grad_coef: Tensor               # lr-free coefficient of dW, [n_out, n_in, 1]
    bias_scale: Tensor | None
    bias_coef: Tensor
    keep: Tensor                    # values to write back at the skeleton entries


@dataclass
class ChainStep:
    """A planned step of one chain block: computed and checked, nothing written yet.

    `grad_ok[i]` (weight layer i's gradients are finite and the update stays in range) and
    `pivot_ok` (every pivot ratio is finite and at least `min_ratio` in magnitude) are
    0-d/1-d boolean tensors, so the caller can check every block with one device sync.
    """

    layers: list[LayerUpdate]
    pivot_ratio: Tensor             # R_j = u_j' / u_j
    grad_ok: list[Tensor]
    pivot_ok: Tensor

    def checks(self) -> list[Tensor]:
        return [self.pivot_ok, *self.grad_ok]


def _node_sums(w: Tensor, g: Tensor, dim: int) -> Tensor:
    """Sums of w * g ([o, i, K]) per row (dim 0) or per column (dim 1).

    (einsum/vecdot lower this to many tiny batched matmuls on the CPU: far slower.)"""
    prod = w * g
    prod = prod.sum(2) if prod.shape[2] > 1 else prod.squeeze(2)
    return prod.sum(1 - dim)


def _max_abs(t: Tensor) -> Tensor:
    low, high = torch.aminmax(t)      # one pass; NaN propagates
    return torch.maximum(-low, high)


def plan_chain_step(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
                    biases: list[Tensor | None], grads: list[Tensor | None],
                    bias_grads: list[Tensor | None], lr: float,
                    min_ratio: float = 0.0) -> ChainStep:
    """Compute one exact G-SGD step of a chain block without writing anything.

    `weights[i]` has `n_{i+1} * n_i * K_i` elements (a Linear weight `[out, in]`, a conv
    weight `[out, in, kh, kw]`, ...); a `None` gradient counts as zero.
    """
    pivot = skeleton.pivot_layer
    skel_values = [_gather(w, index.flat[i]) for i, w in enumerate(weights)]
    ins, outs = chain_products(skeleton, index, skel_values)

    # Inverse-Chain-Rule: S_j collects w * dw over the non-skeleton edges whose path has pivot j.
    pivot_sum = skel_values[pivot].new_zeros(skeleton.num_pivots)
    for i, layer in enumerate(skeleton.layers):
        if layer.role == "pivot" or grads[i] is None:
            continue
        w, g = _as_layer_view(weights[i], layer), _as_layer_view(grads[i], layer)
        skel_wg = skel_values[i] * _gather(g, index.flat[i])
        if layer.role == "in":          # pivot = output node (row)
            pivot_sum[: layer.n_out] += _node_sums(w, g, 0) - skel_wg
        else:                           # pivot = input node (column)
            pivot_sum[: layer.n_in] += _node_sums(w, g, 1) - skel_wg
    for i, layer in enumerate(skeleton.layers):
        if layer.role == "in" and biases[i] is not None and bias_grads[i] is not None:
            pivot_sum[: layer.n_out] += biases[i] * bias_grads[i]

    u = skel_values[pivot]
    du = (_gather(grads[pivot], index.flat[pivot]) if grads[pivot] is not None
          else torch.zeros_like(u))
    t = ins[pivot][index.cols[pivot]] * outs[pivot + 1]
    new_u = u - lr * (du - pivot_sum / u) / (t * t)
    ratio = new_u / u
    pivot_ok = torch.isfinite(ratio) & (ratio.abs() >= min_ratio) & (ratio != 0)

    # Weight-Allocation: SGD on every non-skeleton edge's path value, then divide by R_pi(e).
    layers: list[LayerUpdate] = []
    grad_ok: list[Tensor] = []
    for i, layer in enumerate(skeleton.layers):
        row_scale = outs[i + 1].reciprocal().square()            # 1 / Out^2 per output node
        col_scale = ins[i].reciprocal().square()                 # 1 / In^2 per input node
        if layer.role == "in":
            inv_r = ratio[: layer.n_out].reciprocal()
            row_scale = row_scale * inv_r
        elif layer.role == "out":
            inv_r = ratio[: layer.n_in].reciprocal()
            col_scale = col_scale * inv_r
        else:
            inv_r = None
        grad_coef = (row_scale[:, None] * col_scale[None, :])[:, :, None]
        keep = new_u if layer.role == "pivot" else skel_values[i]
        bias_scale = inv_r if layer.role == "in" else None
        # bound on |lr * coef * dW|: finite iff the gradients are finite and nothing overflows
        bound = row_scale.abs().amax() * col_scale.abs().amax() * lr
        if grads[i] is not None:
            bound = bound * _max_abs(grads[i])
        if biases[i] is not None and bias_grads[i] is not None:
            bound = bound + lr * row_scale.abs().amax() * _max_abs(bias_grads[i])
        ok = torch.isfinite(bound)
        if inv_r is not None:
            ok = ok & torch.isfinite(inv_r).all()
        grad_ok.append(ok)
        layers.append(LayerUpdate(inv_r, grad_coef, bias_scale, row_scale, keep))
    return ChainStep(layers, ratio, grad_ok, pivot_ok.all())


def apply_chain_step(skeleton: ChainSkeleton, index: ChainIndex, step: ChainStep,
                     weights: list[Tensor], biases: list[Tensor | None],
                     grads: list[Tensor | None], bias_grads: list[Tensor | None],
                     lr: float) -> None:
    """Write a planned step into the weights and biases, in place."""
    for i, (layer, update) in enumerate(zip(skeleton.layers, step.layers)):
        w = _as_layer_view(weights[i], layer)
        if update.weight_scale is not None:
            scale = update.weight_scale
            w.mul_(scale[:, None, None] if layer.role == "in" else scale[None, :, None])
        if grads[i] is not None:
            w.addcmul_(_as_layer_view(grads[i], layer), update.grad_coef, value=-lr)
        w.view(-1).index_copy_(0, index.flat[i], update.keep)
        bias = biases[i]
        if bias is not None:
            if update.bias_scale is not None:
                bias.mul_(update.bias_scale)
            if bias_grads[i] is not None:
                bias.addcmul_(bias_grads[i], update.bias_coef, value=-lr)
