"""Brute-force Path-SGD reference: kappa by enumerating every input->output path (float64).

Independent of ``gsgd_cli.optim.path_sgd`` (it shares only the model definitions): a (nested)
``nn.Sequential`` of ``Linear``/``Conv2d``/``ReLU``/``Flatten``/``Dropout``/``Identity``/
``AvgPool2d``/``AdaptiveAvgPool2d`` and the project's residual ``BasicBlock`` (without batch norm)
is unrolled into its dense graph of units (pixels for conv layers, one unit per (channel, row,
column)): every kernel element at every position it is applied at is one edge instance, every
bias is an edge from a constant-1 unit, a pooling output is joined to each input it averages by an
edge with a fixed coefficient (read off the real pooling module by feeding it one-hot images), and
a residual sum joins each output unit to the same unit of both branches with coefficient 1. Then
every path from an input unit or from a bias to an output unit is enumerated, and for each weight
on it the product of the squares of all the OTHER edges on the path (weights and fixed
coefficients) is added to that weight's kappa.

Meant for tiny networks only: the number of paths grows multiplicatively with depth.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.convnets import BasicBlock  # model definition only

# A unit is (tensor id, flat index); tensor 0 is the network input. An incoming edge of a unit:
# (source unit, or None for a bias; squared edge value; (parameter name, flat index) for a weight,
# None for a fixed coefficient: pooling or a residual sum).
Unit = Tuple[int, int]
Edge = Tuple[Optional[Unit], float, Optional[Tuple[str, int]]]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Graph:
    """The dense unrolled network: ``tensors[t][unit]`` = incoming edges of that unit."""

    def __init__(self, n_inputs: int):
        self.tensors: List[List[List[Edge]]] = [[[] for _ in range(n_inputs)]]

    def add(self, units: List[List[Edge]]) -> int:
        self.tensors.append(units)
        return len(self.tensors) - 1


def _linear(g: Graph, name: str, mod: nn.Linear, t: int, n_in: int) -> int:
    assert n_in == mod.in_features, (n_in, mod.in_features)
    w = mod.weight.detach().to(torch.float64).tolist()
    b = None if mod.bias is None else mod.bias.detach().to(torch.float64).tolist()
    units = []
    for o in range(mod.out_features):
        edges: List[Edge] = []
        for i in range(mod.in_features):
            edges.append(((t, i), w[o][i] ** 2, (f"{name}weight", o * mod.in_features + i)))
        if b is not None:
            edges.append((None, b[o] ** 2, (f"{name}bias", o)))
        units.append(edges)
    return g.add(units)


def _conv(g: Graph, name: str, mod: nn.Conv2d, t: int, shape: Tuple[int, int, int]):
    c_in, h, w_ = shape
    assert c_in == mod.in_channels and mod.padding_mode == "zeros"
    kh, kw = mod.kernel_size
    sh, sw = _pair(mod.stride)
    ph, pw = _pair(mod.padding)
    dh, dw = _pair(mod.dilation)
    cin_g = c_in // mod.groups
    cout_g = mod.out_channels // mod.groups
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    weight = mod.weight.detach().to(torch.float64)
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float64).tolist()
    units = []
    for o in range(mod.out_channels):
        grp = o // cout_g
        for oy in range(out_h):
            for ox in range(out_w):
                edges: List[Edge] = []
                for i in range(cin_g):
                    c = grp * cin_g + i
                    for ky in range(kh):
                        iy = oy * sh - ph + ky * dh
                        if not 0 <= iy < h:
                            continue
                        for kx in range(kw):
                            ix = ox * sw - pw + kx * dw
                            if not 0 <= ix < w_:
                                continue
                            flat_w = ((o * cin_g + i) * kh + ky) * kw + kx
                            value = float(weight[o, i, ky, kx])
                            edges.append(((t, (c * h + iy) * w_ + ix), value ** 2,
                                          (f"{name}weight", flat_w)))
                if bias is not None:
                    edges.append((None, bias[o] ** 2, (f"{name}bias", o)))
                units.append(edges)
    return g.add(units), (mod.out_channels, out_h, out_w)


def _probed(g: Graph, mod: nn.Module, t: int, shape: Tuple[int, ...]):
    """Edges of a fixed linear map (pooling), read off the module with one-hot inputs."""
    n_in = _numel(shape)
    columns = []
    with torch.no_grad():
        for j in range(n_in):
            x = torch.zeros(n_in, dtype=torch.float64)
            x[j] = 1.0
            columns.append(mod(x.reshape(1, *shape)).reshape(-1))
        out_shape = tuple(mod(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    units = []
    for o in range(columns[0].numel()):
        edges: List[Edge] = []
        for j in range(n_in):
            c = float(columns[j][o])
            if c != 0.0:
                assert c > 0, "pooling coefficients must be positive"
                edges.append(((t, j), c * c, None))
        units.append(edges)
    return g.add(units), out_shape


def _unroll(g: Graph, mod: nn.Module, prefix: str, t: int, shape: Tuple[int, ...]):
    """Add `mod` applied to tensor `t` (of `shape`) to the graph; return (tensor id, shape)."""
    if isinstance(mod, (nn.ReLU, nn.Dropout, nn.Identity)):
        return t, shape
    if isinstance(mod, nn.Flatten):
        return t, (_numel(shape),)
    if isinstance(mod, nn.Linear):
        return _linear(g, prefix, mod, t, _numel(shape)), (mod.out_features,)
    if isinstance(mod, nn.Conv2d):
        return _conv(g, prefix, mod, t, shape)
    if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _probed(g, mod, t, shape)
    if isinstance(mod, BasicBlock):  # relu(body(x) + shortcut(x))
        t1, s1 = _unroll(g, mod.body, prefix + "body.", t, shape)
        t2, s2 = _unroll(g, mod.shortcut, prefix + "shortcut.", t, shape)
        assert s1 == s2
        return g.add([[((t1, u), 1.0, None), ((t2, u), 1.0, None)]
                      for u in range(_numel(s1))]), s1
    if isinstance(mod, nn.Sequential):
        for name, child in mod.named_children():
            t, shape = _unroll(g, child, f"{prefix}{name}.", t, shape)
        return t, shape
    raise TypeError(f"reference does not handle {type(mod).__name__}")


def unroll(model: nn.Module, input_shape: Sequence[int]) -> Tuple[Graph, int]:
    """The dense graph of `model` and the id of its output tensor."""
    g = Graph(_numel(input_shape))
    t, _ = _unroll(g, model, "", 0, tuple(input_shape))
    return g, t


def enumerate_paths(model: nn.Module, input_shape: Sequence[int]) -> List[List[Edge]]:
    """Every path (list of edges, input side first) from an input unit or a bias to an output."""
    g, out = unroll(model, input_shape)
    paths: List[List[Edge]] = []

    def back(t: int, unit: int, suffix: List[Edge]) -> None:
        for edge in g.tensors[t][unit]:
            path = [edge] + suffix
            src = edge[0]
            if src is None or src[0] == 0:  # starts at a bias, or at an input unit
                paths.append(path)
            else:
                back(src[0], src[1], path)

    for unit in range(len(g.tensors[out])):
        back(out, unit, [])
    return paths


def brute_force_kappa(model: nn.Sequential, input_shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """kappa of every weight and bias, by explicit sums over enumerated paths (float64)."""
    kappa = {name: [0.0] * p.numel() for name, p in model.named_parameters()}
    for path in enumerate_paths(model, input_shape):
        squares = [e[1] for e in path]
        for pos, edge in enumerate(path):
            if edge[2] is None:
                continue
            prod = 1.0
            for other, sq in enumerate(squares):
                if other != pos:
                    prod *= sq
            name, flat = edge[2]
            kappa[name][flat] += prod
    return {name: torch.tensor(vals, dtype=torch.float64).reshape(p.shape)
            for (name, p), vals in zip(model.named_parameters(), kappa.values())}


def brute_force_path_norm_sq(model: nn.Sequential, input_shape: Sequence[int]) -> float:
    """phi(w)^2 = sum over paths of the product of squared edges."""
    total = 0.0
    for path in enumerate_paths(model, input_shape):
        prod = 1.0
        for e in path:
            prod *= e[1]
        total += prod
    return total


def count_paths(model: nn.Sequential, input_shape: Sequence[int]) -> int:
    return len(enumerate_paths(model, input_shape))


__all__ = ["unroll", "enumerate_paths", "brute_force_kappa", "brute_force_path_norm_sq",
           "count_paths"]
