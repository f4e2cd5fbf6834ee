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
    g_e   = dw_e / s_e                               # dLoss/dv_e of the path of edge e
    u_j'  = u_j - lr * g_j / t_j,   R_j = u_j' / u_j
    w_e'  = (w_e - lr * g_e / s_e) / R_pi(e)         # every non-skeleton edge (R = 1 if none)
    free weights unchanged

Options, all in G-space:
* `weight_decay` (L2 on the weights, as SGD's): `dw <- dw + weight_decay * w` first;
* `bpr` (basis-path regularisation, smooth form): `lambda * (sum over paths with a
  non-skeleton edge of v^2 + sum over all-skeleton paths of log(|v|)^2)` is added to the loss,
  i.e. `g_e += 2 lambda v_e` and `g_j += 2 lambda log|v_j| / v_j`;
* `momentum` mu (heavy ball on the basis-path gradient): `b <- mu b + g`, and `b` takes the
  place of `g` in the update. The buffers live in v-space: one per edge, one per pivot.

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


class Workspace:
    """Scratch memory for one block's step, reused every step (on the CPU a fresh full-size
    temporary costs page faults: twice the time of the same operation in place)."""

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = 1
        for n in shape:
            numel *= n
        key = (slot, like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, device=like.device, dtype=like.dtype)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


@dataclass
class StepOptions:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    bpr: float = 0.0
    min_ratio: float = 0.0


@dataclass
class LayerUpdate:
    """What one weight layer needs to apply its step in place."""

    weight_scale: Tensor | None     # 1/R per row ("in") or column ("out"); None: pivot layer
    row_inv_s: Tensor               # 1 / Out per output node
    col_inv_s: Tensor               # 1 / In per input node
    keep: Tensor                    # values to write back at the skeleton entries
    current: Tensor                 # their values before the step


@dataclass
class ChainStep:
    """A planned step of one chain block: computed and checked, nothing written yet.

    `bounds[i]` bounds the size of layer i's update: it is finite iff the layer's gradients
    are finite and the update cannot overflow. `pivot_ok` says that every pivot ratio is
    finite and at least `min_ratio` in magnitude. Both stay on the device, so the caller can
    check every block with one sync.
    """

    layers: list[LayerUpdate]
    pivot_ratio: Tensor             # R_j = u_j' / u_j
    pivot_buffer: Tensor | None     # new momentum buffer of the pivots' paths
    bounds: Tensor
    pivot_ok: Tensor
    grad_max: Tensor                # max |dW| per layer (NaN/Inf when dW is not finite)
    bias_max: Tensor                # max |db| per layer (0 without a bias gradient)

    def ok(self) -> Tensor:
        return self.pivot_ok & torch.isfinite(self.bounds).all()


def _node_sums(w: Tensor, g: Tensor, dim: int, workspace: Workspace) -> Tensor:
    """Sums of w * g ([o, i, K]) per row (dim 0) or per column (dim 1)."""
    prod = torch.mul(w, g, out=workspace.get("prod", tuple(w.shape), w))
    if prod.shape[2] > 1:
        return prod.sum(dim=(1, 2) if dim == 0 else (0, 2))
    return prod.squeeze(2).sum(1 - dim)


def _max_abs(t: Tensor) -> Tensor:
    low, high = torch.aminmax(t)      # one pass, NaN propagates (vector_norm(inf) is ~10x slower)
    return torch.maximum(-low, high)


def pivot_ratio_ok(ratio: Tensor, min_ratio: float) -> Tensor:
    """Per pivot: the step may divide by the new pivot weight, i.e. its ratio to the old one
    is finite, non-zero and at least `min_ratio` in magnitude (the pivot test, written once;
    the fused kernel's test of `r` in `native/gsgd_step.cpp` `run` is its C++ twin)."""
    return torch.isfinite(ratio) & (ratio.abs() >= min_ratio) & (ratio != 0)


def plan_chain_step(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
                    biases: list[Tensor | None], grads: list[Tensor | None],
                    bias_grads: list[Tensor | None], options: StepOptions,
                    pivot_buffer: Tensor | None = None,
                    workspace: Workspace | None = None) -> ChainStep:
    """Compute one exact G-SGD step of a chain block without writing anything.

    `weights[i]` has `n_{i+1} * n_i * K_i` elements (a Linear weight `[out, in]`, a conv
    weight `[out, in, kh, kw]`, ...); a `None` gradient counts as zero. `pivot_buffer` is the
    pivots' momentum buffer (None before the first step).
    """
    lr, wd = options.lr, options.weight_decay
    workspace = workspace or Workspace()
    pivot = skeleton.pivot_layer
    skel_values = [_gather(w, index.flat[i]) for i, w in enumerate(weights)]
    ins, outs = chain_products(skeleton, index, skel_values)

    # Inverse-Chain-Rule: S_j collects w * dw over the non-skeleton edges whose path has pivot j.
    pivot_sum = skel_values[pivot].new_zeros(skeleton.num_pivots)
    for i, layer in enumerate(skeleton.layers):
        if layer.role == "pivot":
            continue
        w = _as_layer_view(weights[i], layer)
        contribution = None
        if grads[i] is not None:
            g = _as_layer_view(grads[i], layer)
            contribution = (_node_sums(w, g, 0 if layer.role == "in" else 1, workspace)
                            - skel_values[i] * _gather(g, index.flat[i]))
        if wd:
            decay = wd * (_node_sums(w, w, 0 if layer.role == "in" else 1, workspace)
                          - skel_values[i] * skel_values[i])
            contribution = decay if contribution is None else contribution + decay
        if contribution is not None:
            pivot_sum[: layer.n_out if layer.role == "in" else layer.n_in] += contribution
    for i, layer in enumerate(skeleton.layers):
        bias = biases[i]
        if layer.role == "in" and bias is not None:
            if bias_grads[i] is not None:
                pivot_sum[: layer.n_out] += bias * bias_grads[i]
            if wd:
                pivot_sum[: layer.n_out] += wd * bias * bias

    u = skel_values[pivot]
    du = (_gather(grads[pivot], index.flat[pivot]) if grads[pivot] is not None
          else torch.zeros_like(u))
    if wd:
        du = du + wd * u
    t = ins[pivot][index.cols[pivot]] * outs[pivot + 1]
    v = u * t
    path_grad = (u * du - pivot_sum) / v
    if options.bpr:
        path_grad = path_grad + 2 * options.bpr * v.abs().log() / v
    new_buffer = None
    if options.momentum:
        new_buffer = (path_grad if pivot_buffer is None
                      else options.momentum * pivot_buffer + path_grad)
        path_grad = new_buffer
    new_u = u - lr * path_grad / t
    ratio = new_u / u
    pivot_ok = pivot_ratio_ok(ratio, options.min_ratio).all()

    # Weight-Allocation: SGD on every non-skeleton edge's path value, then divide by R_pi(e).
    layers: list[LayerUpdate] = []
    scales: list[Tensor] = []       # per layer: largest coefficient of |dW| in the update
    for i, layer in enumerate(skeleton.layers):
        row_inv_s, col_inv_s = outs[i + 1].reciprocal(), ins[i].reciprocal()
        if layer.role == "in":
            inv_r = ratio[: layer.n_out].reciprocal()
        elif layer.role == "out":
            inv_r = ratio[: layer.n_in].reciprocal()
        else:
            inv_r = None
        keep = new_u if layer.role == "pivot" else skel_values[i]
        scale = row_inv_s.square().amax() * col_inv_s.square().amax()
        scales.append(scale if inv_r is None else scale * inv_r.abs().amax())
        layers.append(LayerUpdate(inv_r, row_inv_s, col_inv_s, keep, skel_values[i]))
    # |update| <= lr * scale * max|dW| (+ the bias term)
    zero = ratio.new_zeros(())
    grad_max = [_max_abs(g) if g is not None else zero for g in grads]
    bias_max = [_max_abs(g) if g is not None else zero for g in bias_grads]
    grad_max, bias_max = torch.stack(grad_max), torch.stack(bias_max)
    # lr * dW first: where 1/s^2 underflows to 0, an infinite lr * dW (which the write would
    # multiply by that 0, giving NaN) makes the bound inf * 0 = NaN, not 0, and the check fails
    bounds = (lr * grad_max) * torch.stack(scales) + (lr * bias_max) * \
        torch.stack([u.row_inv_s.square().amax() for u in layers])
    return ChainStep(layers, ratio, new_buffer, bounds, pivot_ok, grad_max, bias_max)


def _outer(rows: Tensor, cols: Tensor, first: bool, last: bool,
           workspace: Workspace) -> Tensor:
    """rows (x) cols as [o, i, 1]. On a block's first layer In = 1 (its inputs), so `cols` is
    all ones and a per-row factor suffices; on its last layer Out = 1, so a per-column one."""
    if first:
        return rows[:, None, None]
    if last:
        return cols[None, :, None]
    out = workspace.get("coef", (rows.numel(), cols.numel()), rows)
    return torch.mul(rows[:, None], cols[None, :], out=out)[:, :, None]


def _broadcast(vector: Tensor, role: str) -> Tensor:
    """A per-node vector as [o, 1, 1] ("in": rows) or [1, i, 1] ("out": columns)."""
    return vector[:, None, None] if role == "in" else vector[None, :, None]


def _gated(value, gate: Tensor | None, identity, dtype: torch.dtype):
    """`value` where `gate` holds, else `identity` (what leaves a weight as it is)."""
    if gate is None:
        return value
    if not isinstance(value, Tensor):
        value = torch.full((), value, dtype=dtype, device=gate.device)   # no host copy
    return torch.where(gate, value, identity)


def _or_zero(x: Tensor, gate: Tensor | None) -> Tensor:
    """A coefficient, replaced by 0 where `gate` is False (not multiplied: inf * 0 is NaN)."""
    return x if gate is None else torch.where(gate, x, 0.0)


def apply_chain_step(skeleton: ChainSkeleton, index: ChainIndex, step: ChainStep,
                     weights: list[Tensor], biases: list[Tensor | None],
                     grads: list[Tensor | None], bias_grads: list[Tensor | None],
                     options: StepOptions, buffers: list[Tensor | None] | None = None,
                     bias_buffers: list[Tensor | None] | None = None,
                     workspace: Workspace | None = None, gate: Tensor | None = None) -> None:
    """Write a planned step into the weights and biases, in place.

    With momentum, `buffers[i]` / `bias_buffers[i]` are the edges' v-space momentum buffers
    (shaped like the weights and biases; zeros before the first step), updated in place.

    `gate` (a boolean tensor on the device, or None for "always"): where it is False, every
    factor of the update is replaced by the one that leaves the weights, biases and buffers
    exactly as they are (gradients by 0, `1/R` and the multipliers by 1, the coefficients by 0),
    so a failed check writes nothing without the host waiting for the device."""
    lr, mu, wd, bpr = options.lr, options.momentum, options.weight_decay, options.bpr
    workspace = workspace or Workspace()
    last = len(skeleton.layers) - 1
    dtype = weights[0].dtype
    for i, (layer, update) in enumerate(zip(skeleton.layers, step.layers)):
        w = _as_layer_view(weights[i], layer)
        g = _as_layer_view(grads[i], layer) if grads[i] is not None else None
        if g is not None and gate is not None:
            g = torch.where(gate, g, 0.0)        # a non-finite dW times 0 would still be NaN
        scale = (_gated(update.weight_scale, gate, 1.0, dtype)   # 1/R per row ("in") or
                 if update.weight_scale is not None else None)   # column ("out")
        # 1/s = rows (x) cols
        rows, cols = _or_zero(update.row_inv_s, gate), _or_zero(update.col_inv_s, gate)
        if not mu:
            # w' = (w * (1 - 2 lr bpr) - lr * (dw + wd * w) / s^2) / R
            rows, cols = rows.square(), cols.square()
            if scale is not None:
                if layer.role == "in":
                    rows = rows * scale
                else:
                    cols = cols * scale
            coef = _outer(rows, cols, i == 0, i == last, workspace)
            multiplier = _gated(1.0 - 2 * lr * bpr, gate, 1.0, dtype)
            keep_scale = (multiplier * _broadcast(scale, layer.role) if scale is not None
                          else multiplier)
            if wd:
                w.mul_(keep_scale - lr * wd * coef)
            elif scale is not None or bpr:
                w.mul_(keep_scale)
            if g is not None:
                w.addcmul_(g, coef, value=-lr)
        else:
            _momentum_update(w, g, _as_layer_view(buffers[i], layer),
                             _outer(rows, cols, i == 0, i == last, workspace),
                             None if scale is None else _broadcast(scale, layer.role), options,
                             gate)
        w.view(-1).index_copy_(0, index.flat[i], _gated(update.keep, gate, update.current, dtype))

        bias = biases[i]
        if bias is None:
            continue
        b_scale = scale if layer.role == "in" else None
        inv_s_b = _or_zero(update.row_inv_s, gate)
        gb = bias_grads[i]
        if gb is not None and gate is not None:
            gb = torch.where(gate, gb, 0.0)
        if not mu:
            coef_b = inv_s_b.square() * (b_scale if b_scale is not None else 1.0)
            multiplier = _gated(1.0 - 2 * lr * bpr, gate, 1.0, dtype) * (
                b_scale if b_scale is not None else 1.0)
            if wd:
                bias.mul_(multiplier - lr * wd * coef_b)
            else:
                bias.mul_(multiplier)
            if gb is not None:
                bias.addcmul_(gb, coef_b, value=-lr)
        else:
            _momentum_update(bias, gb, bias_buffers[i], inv_s_b, b_scale, options, gate)


def _momentum_update(p: Tensor, g: Tensor | None, buffer: Tensor, inv_s: Tensor,
                     scale: Tensor | None, options: StepOptions,
                     gate: Tensor | None = None) -> None:
    """Heavy ball in v-space for the non-skeleton edges of one tensor, in place:
    b <- mu b + (dw + wd w) / s + 2 bpr w s;   w' = (w - lr * b / s) / R  (`scale` = 1/R).
    Where `gate` is False: mu -> 1 and every added term -> 0 (`g` and `inv_s` are 0 there)."""
    lr, wd, bpr = options.lr, options.weight_decay, options.bpr
    buffer.mul_(_gated(options.momentum, gate, 1.0, p.dtype))
    if g is not None:
        buffer.addcmul_(g, inv_s)
    if wd or bpr:
        buffer.addcmul_(p, _or_zero(wd * inv_s + 2 * bpr * inv_s.reciprocal(), gate))
    if scale is not None:
        p.mul_(scale)
        inv_s = inv_s * scale
    p.addcmul_(buffer, inv_s, value=-lr)
