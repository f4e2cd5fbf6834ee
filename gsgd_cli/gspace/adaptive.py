"""Adaptive steps in G-space: Adam and RMSprop on the basis-path values (G-Adam, G-RMSprop).

G-SGD takes an SGD step on the basis-path values `v` of a chain block and maps the new values
back to the weights with the free (skeleton, non-pivot) weights held fixed (`update.py`). G-Adam
and G-RMSprop keep the same coordinates and the same gradient, and replace the SGD step by
torch's Adam / RMSprop rule, elementwise, one coordinate per basis path:

* coordinates: `v_e = w_e * s_e` for every non-skeleton edge `e` (biases included, as edges
  from a constant unit), `s_e` the product of the other weights on its basis path; and
  `v_j = u_j * t_j` for every pivot `j` (its all-skeleton path, `t_j` the product of the free
  weights on it). Free weights are not coordinates.
* gradient (Inverse-Chain-Rule, exactly G-SGD's):

      dw    <- dw + wd * w                              (coupled L2, every weight and bias)
      g_e    = dw_e / s_e
      g_j    = (u_j * du_j - S_j) / v_j,   S_j = sum over non-skeleton e with pi(e) = j of w_e dw_e

  (`maximize` negates the loss gradient `dw` before the decay is added, as torch does; `bpr`
  adds the gradient of G-SGD's basis-path regulariser `bpr * (sum over paths with a
  non-skeleton edge of v^2 + sum over all-skeleton paths of log(|v|)^2)`:
  `g_e += 2 bpr v_e`, `g_j += 2 bpr log|v_j| / v_j`).
* the rule, per coordinate `p`, step count `t` (from 1), torch's conventions exactly:

      Adam:     m_p  <- b1 m_p + (1 - b1) g_p
                q_p  <- b2 q_p + (1 - b2) g_p^2
                qmax_p <- max(qmax_p, q_p)                   (amsgrad; q_p otherwise)
                d_p   = lr * (m_p / (1 - b1^t)) / (sqrt(qmax_p / (1 - b2^t)) + eps)
      RMSprop:  q_p  <- alpha q_p + (1 - alpha) g_p^2
                a_p  <- alpha a_p + (1 - alpha) g_p          (centered)
                den_p = sqrt(q_p - a_p^2) + eps             (centered; sqrt(q_p) + eps otherwise)
                b_p  <- mu b_p + g_p / den_p,   d_p = lr * b_p    (momentum mu > 0)
                d_p   = lr * g_p / den_p                    (mu = 0)
      new value:  v_p' = v_p - d_p

* Weight-Allocation, exactly G-SGD's (free weights fixed, every weight a monomial of `v`):

      u_j' = u_j - d_j / t_j,      R_j = u_j' / u_j
      w_e' = (w_e - d_e / s_e) / R_pi(e)            (R = 1 where the path has no pivot)
      free weights unchanged

Parameters outside every chain block take torch's Adam / RMSprop step with the same
hyper-parameters (that is this rule with `v = w`; `bpr` does not apply there). All coordinates
of a block share one step count `t`.

With `b1 = b2 = 0`, `eps = 0` Adam's `d` is `lr * sign(g)`; as `eps -> inf` with `lr / eps = eta`
fixed, it tends to G-SGD's step with rate `eta`. Every coordinate and its gradient are
invariant under positive rescaling of hidden units (with the same signs), so G-Adam and
G-RMSprop are too; Adam and RMSprop in weight space are not.

Weight decay is coupled L2 on the weights (`dw += wd * w` before the G-space gradient is
formed), the same objective `loss + wd/2 |w|^2` that `GSGD(weight_decay=...)` and
`torch.optim.Adam(weight_decay=...)` (for parameters outside every block) minimise, so one
`weight_decay` means one objective over the whole model. Decoupled decay (AdamW's
`w *= 1 - lr wd`) has no G-space form with the free weights held fixed (it moves them), and a
decoupled decay of `v` would shrink the all-skeleton paths towards 0, which is not weight decay
of anything; the rescaling-invariant regulariser is G-SGD's `bpr`, added to `g`.

Differences from the authors' published code (MSRA-COLT/gsgd `gsgd_cnn/opt/gopt_Adam_method.py`,
`gopt_RMSprop_method.py`), shown by `scripts/compare_authors_adaptive.py`: they fold Adam's
bias corrections into the rate (`eps` is added to `sqrt(q)`, not to `sqrt(q / (1 - b2^t))`),
assume every free weight is 1, step biases with weight-space Adam / RMSprop, and have no weight
decay, amsgrad, momentum or centering in G-space. On a bias-free MLP their MLP path and their
CNN path without batch norm equal this rule to float64 rounding (Adam: with `eps / sqrt(1 -
b2^t)` passed as `eps`). With batch norm, `adam_method='noweight'` is this rule without any
batch-norm scaling (`|w_row|` cancels except in `eps`), and `'weight'` updates the pivot
layer's non-skeleton first moments with `1 - b2` instead of `1 - b1` and divides the pivots'
gradients by `|w_row|` where the other gradients are multiplied by it.

This module holds pure functions of tensors: the elementwise rules (`adam_rule`,
`rmsprop_rule`), used both by the dense reference (`gsgd_cli/testing/reference_adaptive.py`)
and by `chain_adaptive_step`, the closed form for one chain block (per layer, vectorised).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .skeleton import ChainSkeleton
from .update import ChainIndex, chain_products


@dataclass(frozen=True)
class AdamOptions:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    bpr: float = 0.0


@dataclass(frozen=True)
class RMSpropOptions:
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    bpr: float = 0.0


# State of one coordinate tensor: a dict of tensors shaped like it (and the shared step count
# `t`, kept by the caller). Adam: exp_avg, exp_avg_sq (+ max_exp_avg_sq); RMSprop: square_avg
# (+ grad_avg, momentum_buffer). Missing entries count as zeros (the first step).

def adam_rule(grad: Tensor, state: dict[str, Tensor], step: int,
              options: AdamOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """`(d, new_state)`: the Adam decrement of the coordinates (v' = v - d), step `step` >= 1."""
    beta1, beta2 = options.betas
    zeros = torch.zeros_like(grad)
    exp_avg = beta1 * state.get("exp_avg", zeros) + (1 - beta1) * grad
    exp_avg_sq = beta2 * state.get("exp_avg_sq", zeros) + (1 - beta2) * grad * grad
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second = exp_avg_sq
    if options.amsgrad:
        second = torch.maximum(state.get("max_exp_avg_sq", zeros), exp_avg_sq)
        new_state["max_exp_avg_sq"] = second
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    decrement = (options.lr / bias1) * exp_avg / (second.sqrt() / bias2_sqrt + options.eps)
    return decrement, new_state


def rmsprop_rule(grad: Tensor, state: dict[str, Tensor],
                 options: RMSpropOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """`(d, new_state)`: the RMSprop decrement of the coordinates (v' = v - d)."""
    alpha = options.alpha
    zeros = torch.zeros_like(grad)
    square_avg = alpha * state.get("square_avg", zeros) + (1 - alpha) * grad * grad
    new_state = {"square_avg": square_avg}
    if options.centered:
        grad_avg = alpha * state.get("grad_avg", zeros) + (1 - alpha) * grad
        new_state["grad_avg"] = grad_avg
        denom = (square_avg - grad_avg * grad_avg).sqrt() + options.eps
    else:
        denom = square_avg.sqrt() + options.eps
    if options.momentum > 0:
        buffer = options.momentum * state.get("momentum_buffer", zeros) + grad / denom
        new_state["momentum_buffer"] = buffer
        return options.lr * buffer, new_state
    return options.lr * grad / denom, new_state


def _layer_view(t: Tensor, layer) -> Tensor:
    return t.reshape(layer.n_out, layer.n_in, layer.kernel)


@dataclass
class ChainGradient:
    """The basis-path gradient of one chain block, per layer (shaped like the weights) and per
    pivot, and the path factors that map coordinates to weights."""

    weight_grads: list[Tensor]        # g_e = dw_e / s_e ([out, in, K]; 0 at skeleton entries)
    bias_grads: list[Tensor | None]   # g_e of the biases (edges from a constant unit)
    pivot_grad: Tensor                # g_j
    inv_s: list[Tensor]               # 1 / s_e per layer ([out, in, 1])
    bias_inv_s: list[Tensor]          # 1 / s_e of the biases ([out])
    t: Tensor                         # t_j: free weights on pivot j's all-skeleton path
    skeleton_masks: list[Tensor]      # True at skeleton entries ([out, in, K])


def chain_gradient(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
                   biases: list[Tensor | None], grads: list[Tensor | None],
                   bias_grads: list[Tensor | None], weight_decay: float = 0.0,
                   maximize: bool = False, bpr: float = 0.0) -> ChainGradient:
    """Inverse-Chain-Rule for one chain block: `dL/dv` for every basis path, per layer."""
    pivot = skeleton.pivot_layer
    skel_values = [w.reshape(-1).index_select(0, index.flat[i]) for i, w in enumerate(weights)]
    ins, outs = chain_products(skeleton, index, skel_values)

    def effective(g: Tensor | None, w: Tensor) -> Tensor:
        g = torch.zeros_like(w) if g is None else (-g if maximize else g)
        return g + weight_decay * w if weight_decay else g

    dws = [_layer_view(effective(g, w), layer)
           for g, w, layer in zip(grads, weights, skeleton.layers)]
    dbs = [None if b is None else effective(g, b) for g, b in zip(bias_grads, biases)]
    masks = []
    for i, layer in enumerate(skeleton.layers):
        mask = torch.zeros(layer.n_out * layer.n_in * layer.kernel, dtype=torch.bool,
                           device=weights[i].device)
        mask[index.flat[i]] = True
        masks.append(_layer_view(mask, layer))
    pivot_sum = skel_values[pivot].new_zeros(skeleton.num_pivots)
    for i, layer in enumerate(skeleton.layers):
        if layer.role == "pivot":
            continue
        wdw = torch.where(masks[i], 0.0, _layer_view(weights[i], layer) * dws[i])
        if layer.role == "in":
            pivot_sum[: layer.n_out] += wdw.sum(dim=(1, 2))
            if dbs[i] is not None:
                pivot_sum[: layer.n_out] += biases[i] * dbs[i]
        else:
            pivot_sum[: layer.n_in] += wdw.sum(dim=(0, 2))
    u = skel_values[pivot]
    du = dws[pivot].reshape(-1).index_select(0, index.flat[pivot])
    t = ins[pivot][index.cols[pivot]] * outs[pivot + 1]
    v = u * t
    pivot_grad = (u * du - pivot_sum) / v
    if bpr:
        pivot_grad = pivot_grad + 2 * bpr * v.abs().log() / v
    inv_s, bias_inv_s, weight_grads, bias_grads_v = [], [], [], []
    for i, layer in enumerate(skeleton.layers):
        inv = (outs[i + 1].reciprocal()[:, None] * ins[i].reciprocal()[None, :])[:, :, None]
        inv_s.append(inv)
        bias_inv_s.append(outs[i + 1].reciprocal())
        g = dws[i] * inv
        if bpr:                         # 2 bpr v_e, v_e = w_e s_e
            g = g + 2 * bpr * _layer_view(weights[i], layer) / inv
        weight_grads.append(torch.where(masks[i], 0.0, g))
        gb = None if dbs[i] is None else dbs[i] * bias_inv_s[i]
        if gb is not None and bpr:
            gb = gb + 2 * bpr * biases[i] / bias_inv_s[i]
        bias_grads_v.append(gb)
    return ChainGradient(weight_grads, bias_grads_v, pivot_grad, inv_s, bias_inv_s, t, masks)


def allocate(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
             biases: list[Tensor | None], gradient: ChainGradient,
             weight_decrements: list[Tensor], bias_decrements: list[Tensor | None],
             pivot_decrement: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
    """Weight-Allocation: new weights and biases (new tensors) from the decrements `d` of
    every coordinate (v' = v - d), free weights fixed."""
    pivot = skeleton.pivot_layer
    u = weights[pivot].reshape(-1).index_select(0, index.flat[pivot])
    new_u = u - pivot_decrement / gradient.t
    ratio = new_u / u
    new_weights, new_biases = [], []
    for i, layer in enumerate(skeleton.layers):
        w = _layer_view(weights[i], layer)
        moved = w - weight_decrements[i] * gradient.inv_s[i]
        bias = biases[i]
        new_bias = None if bias is None else bias - bias_decrements[i] * gradient.bias_inv_s[i]
        if layer.role == "in":
            moved = moved / ratio[: layer.n_out][:, None, None]
            if new_bias is not None:
                new_bias = new_bias / ratio[: layer.n_out]
        elif layer.role == "out":
            moved = moved / ratio[: layer.n_in][None, :, None]
        new_w = torch.where(gradient.skeleton_masks[i], w, moved).reshape(-1)
        if layer.role == "pivot":
            new_w = new_w.index_copy(0, index.flat[i], new_u)
        new_weights.append(new_w.reshape(weights[i].shape))
        new_biases.append(new_bias)
    return new_weights, new_biases


def chain_adaptive_step(skeleton: ChainSkeleton, index: ChainIndex, weights: list[Tensor],
                        biases: list[Tensor | None], grads: list[Tensor | None],
                        bias_grads: list[Tensor | None], state: dict, step: int,
                        options: AdamOptions | RMSpropOptions):
    """One G-Adam (AdamOptions) or G-RMSprop (RMSpropOptions) step of one chain block.

    Pure: returns `(new_weights, new_biases, new_state)`. `state` maps `("w", i)` and
    `("b", i)` to the rule's state dicts of layer i's weight and bias (missing: first step),
    tensors shaped like the parameter, as torch keeps them: a non-skeleton entry holds the
    state of its edge's basis path, a pivot entry that of the pivot's all-skeleton path, and
    the free weights' entries stay 0. `step` counts from 1.
    """
    gradient = chain_gradient(skeleton, index, weights, biases, grads, bias_grads,
                              options.weight_decay, options.maximize, options.bpr)
    pivot = skeleton.pivot_layer
    pivot_flat = index.flat[pivot]

    def rule(g: Tensor, key) -> Tensor:
        old = state.get(key, {})
        if isinstance(options, AdamOptions):
            d, new_state[key] = adam_rule(g, old, step, options)
        else:
            d, new_state[key] = rmsprop_rule(g, old, options)
        return d

    new_state: dict = {}
    weight_d = []
    for i, g in enumerate(gradient.weight_grads):
        free = gradient.skeleton_masks[i]
        if i == pivot:       # the pivots' coordinates sit at their own entries
            g = g.reshape(-1).index_copy(0, pivot_flat, gradient.pivot_grad).reshape(g.shape)
            free = torch.zeros_like(free)
        d = rule(g.reshape(weights[i].shape), ("w", i)).reshape(g.shape)
        weight_d.append(torch.where(free, 0.0, d))
        new_state["w", i] = {k: torch.where(free.reshape(v.shape), 0.0, v)
                             for k, v in new_state["w", i].items()}
    pivot_d = weight_d[pivot].reshape(-1).index_select(0, pivot_flat)
    bias_d = [None if g is None else rule(g, ("b", i))
              for i, g in enumerate(gradient.bias_grads)]
    new_weights, new_biases = allocate(skeleton, index, weights, biases, gradient, weight_d,
                                       bias_d, pivot_d)
    return new_weights, new_biases, new_state
