"""Brute-force Path-SGD reference: kappa by enumerating every input->output path (float64).

Independent of ``gsgd_cli.optim.path_sgd`` (it shares only the model definition): an
``nn.Sequential`` of ``Linear``/``Conv2d``/``ReLU``/``Flatten``/``Dropout``/``Identity``/
``AvgPool2d``/``AdaptiveAvgPool2d`` is unrolled into its dense graph of units (pixels for conv
layers, one unit per (channel, row, column)): every kernel element at every position it is applied
at is one edge instance, every bias is an edge from a constant-1 unit, and a pooling output is
joined to each input it averages by an edge with a fixed coefficient (read off the real pooling
module by feeding it one-hot images). Then every path from an input unit or from a bias to an
output unit is enumerated, and for each weight on it the product of the squares of all the
OTHER edges on the path (weights and pooling coefficients) is added to that weight's kappa.

Meant for tiny networks only: the number of paths grows multiplicatively with depth.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

# An incoming edge of a unit: (source unit index or None for a bias, squared edge value,
# (parameter name, flat index) for a weight or None for a fixed coefficient).
Edge = Tuple[Optional[int], float, Optional[Tuple[str, int]]]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _linear_layer(name: str, mod: nn.Linear, n_in: int) -> List[List[Edge]]:
    assert n_in == mod.in_features, (n_in, mod.in_features)
    w = mod.weight.detach().to(torch.float64).tolist()
    b = None if mod.bias is None else mod.bias.detach().to(torch.float64).tolist()
    layer = []
    for o in range(mod.out_features):
        edges: List[Edge] = []
        for i in range(mod.in_features):
            edges.append((i, w[o][i] ** 2, (f"{name}.weight", o * mod.in_features + i)))
        if b is not None:
            edges.append((None, b[o] ** 2, (f"{name}.bias", o)))
        layer.append(edges)
    return layer


def _conv_layer(name: str, mod: nn.Conv2d, shape: Tuple[int, int, int]):
    c_in, h, w_ = shape
    assert c_in == mod.in_channels and mod.padding_mode == "zeros"
    kh, kw = mod.kernel_size
    sh, sw = _pair(mod.stride)
    ph, pw = _pair(mod.padding)
    dh, dw = _pair(mod.dilation)
    groups = mod.groups
    cin_g = c_in // groups
    cout_g = mod.out_channels // groups
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    weight = mod.weight.detach().to(torch.float64)
    bias = None if mod.bias is None else mod.bias.detach().to(torch.float64).tolist()
    layer = []
    for o in range(mod.out_channels):
        g = o // cout_g
        for oy in range(out_h):
            for ox in range(out_w):
                edges: List[Edge] = []
                for i in range(cin_g):
                    c = g * cin_g + i
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
                            edges.append(((c * h + iy) * w_ + ix, value ** 2,
                                          (f"{name}.weight", flat_w)))
                if bias is not None:
                    edges.append((None, bias[o] ** 2, (f"{name}.bias", o)))
                layer.append(edges)
    return layer, (mod.out_channels, out_h, out_w)


def _probed_layer(mod: nn.Module, shape: Tuple[int, ...]):
    """Edges of a fixed linear map (pooling), read off the module with one-hot inputs."""
    n_in = 1
    for s in shape:
        n_in *= s
    columns = []
    with torch.no_grad():
        for j in range(n_in):
            x = torch.zeros(n_in, dtype=torch.float64)
            x[j] = 1.0
            columns.append(mod(x.reshape(1, *shape)).reshape(-1))
    out_shape = tuple(mod(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    n_out = columns[0].numel()
    layer = []
    for o in range(n_out):
        edges: List[Edge] = []
        for j in range(n_in):
            c = float(columns[j][o])
            if c != 0.0:
                assert c > 0, "pooling coefficients must be positive"
                edges.append((j, c * c, None))
        layer.append(edges)
    return layer, out_shape


def unroll(model: nn.Sequential, input_shape: Sequence[int]) -> List[List[List[Edge]]]:
    """The dense layered graph: ``layers[l][unit]`` = incoming edges of that unit."""
    shape = tuple(input_shape)
    layers = []
    for name, mod in model.named_children():
        if isinstance(mod, (nn.ReLU, nn.Dropout, nn.Identity)):
            continue
        if isinstance(mod, nn.Flatten):
            n = 1
            for s in shape:
                n *= s
            shape = (n,)
        elif isinstance(mod, nn.Linear):
            n = 1
            for s in shape:
                n *= s
            layers.append(_linear_layer(name, mod, n))
            shape = (mod.out_features,)
        elif isinstance(mod, nn.Conv2d):
            layer, shape = _conv_layer(name, mod, shape)
            layers.append(layer)
        elif isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            layer, shape = _probed_layer(mod, shape)
            layers.append(layer)
        else:
            raise TypeError(f"reference does not handle {type(mod).__name__}")
    return layers


def enumerate_paths(layers) -> List[List[Edge]]:
    """Every path (list of edges, input side first) ending at an output unit."""
    paths: List[List[Edge]] = []

    def back(level: int, unit: int, suffix: List[Edge]) -> None:
        for edge in layers[level][unit]:
            src = edge[0]
            path = [edge] + suffix
            if src is None or level == 0:  # starts at a bias, or at an input unit
                paths.append(path)
            else:
                back(level - 1, src, path)

    last = len(layers) - 1
    for out in range(len(layers[last])):
        back(last, out, [])
    return paths


def brute_force_kappa(model: nn.Sequential, input_shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """kappa of every weight and bias, by explicit sums over enumerated paths (float64)."""
    kappa = {name: [0.0] * p.numel() for name, p in model.named_parameters()}
    for path in enumerate_paths(unroll(model, input_shape)):
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
    for path in enumerate_paths(unroll(model, input_shape)):
        prod = 1.0
        for e in path:
            prod *= e[1]
        total += prod
    return total


def count_paths(model: nn.Sequential, input_shape: Sequence[int]) -> int:
    return len(enumerate_paths(unroll(model, input_shape)))


__all__ = ["unroll", "enumerate_paths", "brute_force_kappa", "brute_force_path_norm_sq",
           "count_paths"]
