"""Setting the skeleton weights at construction (`skeleton_init`): to 1 (the paper), kept
(checked non-zero), or reached by a positive rescaling of the hidden nodes that keeps the
network function (`rescale_free_weights_to_unit`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .skeleton import ChainSkeleton

__all__ = ["SKELETON_INITS", "init_skeleton", "rescale_free_weights_to_unit"]

SKELETON_INITS = ("one", "keep", "rescale")


def init_skeleton(mode: str, names: Sequence[str], skeleton: ChainSkeleton,
                  weights: list[Tensor], biases: list[Tensor | None], bn_approx: bool) -> int:
    """Apply `skeleton_init=mode` to one block's contiguous weights (in place); returns how
    many weights were set to 1 and were not 1 before."""
    changed = 0
    for name, w, layer in zip(names, weights, skeleton.layers):
        flat = w.view(-1)
        index = layer.flat.to(w.device)
        if mode == "one":
            if flat.device.type != "meta":      # meta tensors have no values to count
                changed += int((flat.index_select(0, index) != 1).sum())
            flat.index_fill_(0, index, 1.0)
        elif bool((flat.index_select(0, index) == 0).any()):
            raise ValueError(f"layer '{name}' has a skeleton weight equal to 0; G-SGD "
                             "divides by skeleton weights: use skeleton_init='one' or "
                             "re-initialise the layer")
    if mode == "rescale":
        if bn_approx:
            raise ValueError(f"skeleton_init='rescale' keeps the network function only "
                             f"without batch norm, and block {names[0]} -> ... "
                             "has batch norm: use skeleton_init='one'")
        rescale_free_weights_to_unit(skeleton, weights, biases)
    return changed


def rescale_free_weights_to_unit(skeleton: ChainSkeleton, weights: list[Tensor],
                                 biases: list[Tensor | None]) -> None:
    """Positively rescale the hidden nodes so that every free skeleton weight is +1 or -1.

    Node scales `c` (1 on inputs and outputs) follow the free weights: forwards through the
    layers before the pivot layer (`c_j = c_a / |w_{j,a}|` for node j's incoming free
    weight), backwards through the layers after it (`c_j = c_b * |w_{b,j}|`); then every
    layer is multiplied by `c_out / c_in` and every bias by `c_out`. In place."""
    widths = skeleton.widths
    device, dtype = weights[0].device, weights[0].dtype
    scales = [torch.ones(n, device=device, dtype=dtype) for n in widths]
    free = [w.reshape(-1).index_select(0, layer.flat.to(device)).abs()
            for w, layer in zip(weights, skeleton.layers)]
    for i, layer in enumerate(skeleton.layers[: skeleton.pivot_layer]):
        scales[i + 1] = scales[i][layer.cols.to(device)] / free[i]
    for i in range(len(skeleton.layers) - 1, skeleton.pivot_layer, -1):
        layer = skeleton.layers[i]
        scales[i] = scales[i + 1][layer.rows.to(device)] * free[i]
    for i, layer in enumerate(skeleton.layers):
        view = weights[i].view(layer.n_out, layer.n_in, layer.kernel)
        view.mul_((scales[i + 1][:, None] / scales[i][None, :])[:, :, None])
        if biases[i] is not None:
            biases[i].mul_(scales[i + 1])

