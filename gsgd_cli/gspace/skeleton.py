"""Skeleton weights, pivots and chains of one chain block: pure index math on the widths.

A chain block has node layers `0 .. L` of widths `n_0 .. n_L` (input, hidden `1 .. L-1`,
output) and weight layers `0 .. L-1`; weight layer `i` maps node layer `i` to `i + 1` and is
viewed as `[n_{i+1}, n_i, K_i]` (rows: output nodes, columns: input nodes, `K_i` parallel edges
per node pair, 1 for a Linear layer, the kernel size for a convolution).

The pivot layer `P` is the weight layer feeding the widest hidden layer (first among equals).
Skeleton entries (at kernel offset `centre`):

* layers `i <= P`: `[j, j mod n_i]` for every output node `j < n_{i+1}` (one per row);
* layers `i > P`: `[j mod n_{i+1}, j]` for every input node `j < n_i` (one per column).

The entries of layer `P` are the pivots (updated by G-SGD); all other skeleton entries are
free weights, held fixed. Layers `i < P` give every hidden node of layer `i+1` its incoming
free weight (towards an input); layers `i > P` give every hidden node of layer `i` its outgoing
free weight (towards an output): `H` free weights in all, a spanning tree of the hidden nodes
once inputs and outputs are merged. Chain `j` (for `j < n_{P+1}`) runs through node `j` of every
hidden layer that has one; every hidden node lies on the chain of the same index, so the
pivot of node `j` is pivot `j` in every layer.

This construction needs the hidden widths to rise (weakly) up to the widest hidden layer and
fall (weakly) after it. A hidden layer narrower than hidden layers on both sides (a "valley")
is refused: the published code silently builds a rank-deficient basis there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedWidthProfile(ValueError):
    """The hidden widths of a chain block have a valley (not single-peaked).

    `hidden_layer` is the 1-based number of the narrow hidden layer (the output of the
    block's layer `hidden_layer - 1`, counting from 0)."""

    def __init__(self, message: str, hidden_layer: int):
        super().__init__(message)
        self.hidden_layer = hidden_layer


@dataclass(frozen=True)
class LayerSkeleton:
    """Skeleton of one weight layer, as index vectors into its `[out, in, K]` view."""

    index: int            # weight layer number i inside the block
    role: str             # "in" (i < P), "pivot" (i == P) or "out" (i > P)
    n_in: int
    n_out: int
    kernel: int           # K: parallel edges per node pair
    centre: int           # kernel offset of the skeleton edge
    rows: torch.Tensor    # skeleton entry k sits at [rows[k], cols[k], centre]
    cols: torch.Tensor

    @property
    def flat(self) -> torch.Tensor:
        """Flat indices of the skeleton entries in the contiguous weight tensor."""
        return (self.rows * self.n_in + self.cols) * self.kernel + self.centre


@dataclass(frozen=True)
class ChainSkeleton:
    widths: tuple[int, ...]        # n_0 .. n_L
    pivot_layer: int               # P
    layers: tuple[LayerSkeleton, ...]

    @property
    def num_hidden(self) -> int:
        """H: number of hidden nodes (= number of free weights)."""
        return sum(self.widths[1:-1])

    @property
    def num_pivots(self) -> int:
        return self.widths[self.pivot_layer + 1]


def pivot_layer_of(widths: tuple[int, ...]) -> int:
    hidden = widths[1:-1]
    return hidden.index(max(hidden))  # weight layer feeding the first widest hidden layer


def check_single_peak(widths: tuple[int, ...]) -> None:
    """Raise UnsupportedWidthProfile naming the first valley hidden layer (1-based)."""
    hidden = widths[1:-1]
    for k in range(1, len(hidden) - 1):
        if max(hidden[:k]) > hidden[k] < max(hidden[k + 1:]):
            raise UnsupportedWidthProfile(
                f"hidden layer {k + 1} (width {hidden[k]}) is narrower than hidden layers "
                f"on both sides (widths {list(widths)}): a width valley", k + 1)


def build_skeleton(widths: tuple[int, ...] | list[int],
                   kernels: tuple[int, ...] | None = None,
                   centres: tuple[int, ...] | None = None) -> ChainSkeleton:
    widths = tuple(int(w) for w in widths)
    if len(widths) < 3:
        raise ValueError(f"a chain block needs at least one hidden layer, got widths {widths}")
    if min(widths) < 1:
        raise ValueError(f"widths must be positive, got {widths}")
    num_layers = len(widths) - 1
    kernels = kernels or (1,) * num_layers
    centres = centres or (0,) * num_layers
    check_single_peak(widths)
    pivot = pivot_layer_of(widths)
    layers = []
    for i in range(num_layers):
        n_in, n_out = widths[i], widths[i + 1]
        if i <= pivot:
            rows = torch.arange(n_out)
            cols = rows % n_in
        else:
            cols = torch.arange(n_in)
            rows = cols % n_out
        role = "in" if i < pivot else "pivot" if i == pivot else "out"
        layers.append(LayerSkeleton(i, role, n_in, n_out, kernels[i], centres[i], rows, cols))
    return ChainSkeleton(widths, pivot, tuple(layers))
