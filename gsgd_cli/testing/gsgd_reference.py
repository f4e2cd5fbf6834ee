"""Brute-force G-SGD for tiny ReLU MLPs, in float64: the yardstick for the fast path.

Everything here is deliberately explicit and slow: every input->output path is enumerated
(including paths that start at a bias, an edge from a constant unit), the structure matrix is
built densely, the basis paths are written out edge by edge, and one G-SGD step solves the
paper's equations densely:

* eq. (4), Inverse-Chain-Rule:  dL/dw_e = sum_p dL/dv_p * dv_p/dw_e  for all m weights: the
  m - H basis-path gradients solve the rows of the non-free weights (a dense square solve),
  and the remaining H rows are checked to hold as well (the system is consistent);
* eq. (6), Weight-Allocation: the weight ratios r with free weights' ratio 1 and
  prod_{e in p} r_e = R_p = v_p'/v_p on every basis path, solved in log-magnitude space with
  the dense inverse of A~, and the signs from the same (integer) inverse mod 2.

It shares no code with `skeleton.py` / `update.py`: the skeleton rule is re-implemented here
from its description, node by node.

Convolutions are handled as the channel graph they define: a weight `[out, in, K]` has K
parallel edges from each input channel to each output channel (the kernel elements; a Linear
layer reading a flattened map of `in` channels has one per position), and the skeleton edge of
a channel pair is the one at offset `centres[i]`. The loss depends on the weights only through
the values of these channel-graph paths, so eqs. (4) and (6) apply unchanged.

Edges are numbered in parameter order: layer 0 weight (row-major `[out, in, K]`), layer 0
bias, layer 1 weight, ...
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Net:
    """A tiny chain: `weights[i]` is `[n_{i+1}, n_i]` or `[n_{i+1}, n_i, K_i]`, `biases[i]` is
    `[n_{i+1}]` or None; `centres[i]` is the offset of the skeleton edge (default 0)."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    centres: list[int] | None = None

    @property
    def widths(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    def kernel(self, i: int) -> int:
        return self.weights[i].shape[2] if self.weights[i].dim() == 3 else 1

    def centre(self, i: int) -> int:
        return self.centres[i] if self.centres else 0

    def edge_ids(self):
        """weight_id[i][b][a][k], bias_id[i][b] (None if no bias), and m."""
        weight_id, bias_id, m = [], [], 0
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            rows, cols, kernel = w.shape[0], w.shape[1], self.kernel(i)
            weight_id.append([[[m + (r * cols + c) * kernel + k for k in range(kernel)]
                               for c in range(cols)] for r in range(rows)])
            m += rows * cols * kernel
            if b is None:
                bias_id.append(None)
            else:
                bias_id.append([m + r for r in range(rows)])
                m += rows
        return weight_id, bias_id, m

    def flat(self) -> Tensor:
        parts = []
        for w, b in zip(self.weights, self.biases):
            parts.append(w.reshape(-1))
            if b is not None:
                parts.append(b.reshape(-1))
        return torch.cat(parts).to(torch.float64)

    def unflat(self, vector: Tensor) -> "Net":
        weights, biases, k = [], [], 0
        for w, b in zip(self.weights, self.biases):
            weights.append(vector[k:k + w.numel()].reshape(w.shape).clone())
            k += w.numel()
            if b is None:
                biases.append(None)
            else:
                biases.append(vector[k:k + b.numel()].clone())
                k += b.numel()
        return Net(weights, biases, self.centres)


def all_paths(net: Net) -> list[tuple[int, ...]]:
    """Every path as a tuple of edge ids: input paths, then paths starting at each bias."""
    widths = net.widths
    weight_id, bias_id, _ = net.edge_ids()
    num_layers = len(net.weights)
    kernels = [net.kernel(i) for i in range(num_layers)]
    paths = []
    for nodes in itertools.product(*[range(n) for n in widths]):
        for offsets in itertools.product(*[range(k) for k in kernels]):
            paths.append(tuple(weight_id[i][nodes[i + 1]][nodes[i]][offsets[i]]
                               for i in range(num_layers)))
    for start in range(num_layers):
        if bias_id[start] is None:
            continue
        for nodes in itertools.product(*[range(n) for n in widths[start + 1:]]):
            for offsets in itertools.product(*[range(k) for k in kernels[start + 1:]]):
                path = [bias_id[start][nodes[0]]]
                for k in range(1, len(nodes)):
                    path.append(weight_id[start + k][nodes[k]][nodes[k - 1]][offsets[k - 1]])
                paths.append(tuple(path))
    return paths


def structure_matrix(paths: list[tuple[int, ...]], m: int) -> Tensor:
    """A[e, p] = 1 if edge e lies on path p (m x #paths, float64)."""
    a = torch.zeros(m, len(paths), dtype=torch.float64)
    for p, path in enumerate(paths):
        for e in path:
            a[e, p] = 1.0
    return a


@dataclass
class Basis:
    free: list[int]                      # edge ids of the H free skeleton weights
    paths: list[tuple[int, ...]]         # the m - H basis paths
    pivots: list[int]                    # edge ids of the pivots (skeleton, not free)


def skeleton_basis(net: Net) -> Basis:
    """The skeleton rule, node by node, and the basis path of every non-free edge."""
    widths = net.widths
    weight_id, bias_id, m = net.edge_ids()
    hidden = widths[1:-1]
    num_layers = len(widths) - 1
    # pivot layer: the weight layer feeding the first widest hidden layer
    p = max(range(len(hidden)), key=lambda k: (hidden[k], -k))
    # For every hidden node (layer k, index n): the skeleton edge on its chain towards the
    # input (in_edge: (layer, row, col)) and towards the output (out_edge).
    in_edge, out_edge = {}, {}
    for k in range(1, num_layers):
        for n in range(widths[k]):
            layer = k - 1
            if layer <= p:
                in_edge[k, n] = (layer, n, n % widths[k - 1])
            else:
                in_edge[k, n] = (layer, n, n)          # node n is fed by node n (solid)
            layer = k
            if layer > p:
                out_edge[k, n] = (layer, n % widths[k + 1], n)
            else:
                out_edge[k, n] = (layer, n, n)         # node n feeds node n (solid)
    def edge(layer: int, r: int, c: int) -> int:       # the skeleton edge of a node pair
        return weight_id[layer][r][c][net.centre(layer)]

    skeleton = set()
    for layer in range(num_layers):
        for j in range(widths[layer + 1] if layer <= p else widths[layer]):
            r, c = (j, j % widths[layer]) if layer <= p else (j % widths[layer + 1], j)
            skeleton.add(edge(layer, r, c))
    pivots = [edge(p, j, j % widths[p]) for j in range(widths[p + 1])]
    free = sorted(skeleton - set(pivots))

    def in_chain(k: int, n: int) -> list[int]:
        edges = []
        while k > 0:
            layer, r, c = in_edge[k, n]
            edges.append(edge(layer, r, c))
            k, n = k - 1, c
        return edges

    def out_chain(k: int, n: int) -> list[int]:
        edges = []
        while k < num_layers:
            layer, r, c = out_edge[k, n]
            edges.append(edge(layer, r, c))
            k, n = k + 1, r
        return edges

    paths = []
    free_set = set(free)
    for layer in range(num_layers):
        for r in range(widths[layer + 1]):
            for c in range(widths[layer]):
                for e in weight_id[layer][r][c]:
                    if e in free_set:
                        continue
                    paths.append(tuple(sorted(in_chain(layer, c) + [e]
                                              + out_chain(layer + 1, r))))
            if bias_id[layer] is not None:
                e = bias_id[layer][r]
                paths.append(tuple(sorted([e] + out_chain(layer + 1, r))))
    assert len(skeleton) == len(free) + len(pivots)
    assert len(paths) == m - len(free), (len(paths), m, len(free))
    return Basis(free, paths, pivots)


def forward(net: Net, x: Tensor) -> Tensor:
    for i, (w, b) in enumerate(zip(net.weights, net.biases)):
        x = x @ w.T
        if b is not None:
            x = x + b
        if i < len(net.weights) - 1:
            x = torch.relu(x)
    return x


def path_values(net: Net, basis: Basis) -> Tensor:
    w = net.flat()
    return torch.stack([torch.prod(w[list(path)]) for path in basis.paths])


def bpr_value(net: Net, coefficient: float, basis: Basis | None = None) -> Tensor:
    """lambda * (sum over paths with a non-skeleton edge of v^2 + sum over all-skeleton
    paths of log(|v|)^2), as a differentiable function of the net's tensors."""
    basis = basis or skeleton_basis(net)
    skeleton = set(basis.free) | set(basis.pivots)
    w = torch.cat([t.reshape(-1) for pair in zip(net.weights, net.biases)
                   for t in pair if t is not None])
    total = w.new_zeros(())
    for path in basis.paths:
        v = torch.prod(w[list(path)])
        total = total + (v.abs().log() ** 2 if set(path) <= skeleton else v ** 2)
    return coefficient * total


def gsgd_step(net: Net, weight_grad: Tensor, lr: float, basis: Basis | None = None,
              momentum: float = 0.0, buffer: Tensor | None = None, bpr: float = 0.0,
              weight_decay: float = 0.0) -> tuple[Net, Tensor] | Net:
    """One G-SGD step by dense solves of eqs. (4) and (6); `weight_grad` is flat dL/dw.

    With `momentum`, `buffer` (one entry per basis path, None at first) is the heavy-ball
    buffer in v-space and `(new net, new buffer)` is returned. `bpr` adds the gradient of
    `bpr_value` to the basis-path gradient; `weight_decay` adds `wd * w` to `weight_grad`."""
    basis = basis or skeleton_basis(net)
    w = net.flat()
    weight_grad = weight_grad.to(torch.float64) + weight_decay * w
    m = w.numel()
    k = len(basis.paths)
    # v_p and dv_p/dw_e = product of the other weights on p
    values = path_values(net, basis)
    dv_dw = torch.zeros(m, k, dtype=torch.float64)
    for p, path in enumerate(basis.paths):
        for e in path:
            others = [f for f in path if f != e]
            dv_dw[e, p] = torch.prod(w[others]) if others else 1.0
    # eq. (4): dL/dw = G dL/dv. In the chart (free weights fixed) dL/dv solves the rows of
    # the non-free weights, a square system; for a loss invariant under rescaling (no weight
    # decay) the free weights' rows must then hold too: the whole system is consistent.
    free = set(basis.free)
    rows = [e for e in range(m) if e not in free]
    solution = torch.linalg.solve(dv_dw[rows], weight_grad[rows])
    if not weight_decay:
        residual = (dv_dw @ solution - weight_grad).abs().max()
        scale = max(1.0, float(weight_grad.abs().max()))
        assert residual <= 1e-8 * scale, f"eq. (4) is inconsistent: residual {float(residual):.3g}"
    if bpr:
        skeleton = set(basis.free) | set(basis.pivots)
        all_skeleton = torch.tensor([set(path) <= skeleton for path in basis.paths])
        solution = solution + 2 * bpr * torch.where(all_skeleton, values.abs().log() / values,
                                                    values)
    if momentum:
        buffer = solution if buffer is None else momentum * buffer + solution
        solution = buffer
    new_values = values - lr * solution
    ratio = new_values / values
    # eq. (6): A~ = [free indicator columns | basis path columns], m x m
    a_tilde = torch.zeros(m, m, dtype=torch.float64)
    for col, e in enumerate(basis.free):
        a_tilde[e, col] = 1.0
    for p, path in enumerate(basis.paths):
        a_tilde[list(path), len(basis.free) + p] = 1.0
    inverse = torch.linalg.inv(a_tilde)
    assert torch.allclose(inverse, inverse.round(), atol=1e-9), "A~ is not unimodular"
    inverse = inverse.round()
    rhs_log = torch.cat([torch.zeros(len(basis.free), dtype=torch.float64), ratio.abs().log()])
    rhs_neg = torch.cat([torch.zeros(len(basis.free), dtype=torch.float64),
                         (ratio < 0).to(torch.float64)])
    log_r = rhs_log @ inverse           # row vector times A~^{-1}, as in eq. (6)
    negative = torch.remainder(rhs_neg @ inverse, 2.0) > 0.5
    r = torch.where(negative, -1.0, 1.0) * log_r.exp()
    new_net = net.unflat(w * r)
    return (new_net, buffer) if momentum else new_net


def hidden_count(net: Net) -> int:
    return sum(net.widths[1:-1])
