"""The rescaling-invariance oracle for G-SGD (issue 10): for every block GSGD steps, the
positive rescaling of its hidden nodes that G-SGD assumes (through each layer's
`[n_out, n_in, K]` view) must leave the network's function unchanged, and two copies related by
it must compute the same function after every G-SGD step (float64)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..optim import GSGD, GSGDWarning
from .helpers import randomise

__all__ = ["quiet_gsgd", "rescale_blocks", "assert_invariant"]


def quiet_gsgd(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return GSGD(model, **kwargs)


def rescale_blocks(model, blocks, generator, low=0.3, high=3.0):
    """g(w) as G-SGD sees it: hidden node j of each block gets c_j > 0 on its incoming weights
    (and bias) and 1/c_j on its outgoing ones, through the layers' [n_out, n_in, K] views."""
    with torch.no_grad():
        for block in blocks:
            layers = [model.get_submodule(name) for name in block.names]
            for left, right, view in zip(layers[:-1], layers[1:], block.views[1:]):
                c = low + (high - low) * torch.rand(view.n_in, generator=generator,
                                                    dtype=torch.float64)
                left.weight.mul_(c.view(-1, *[1] * (left.weight.dim() - 1)))
                if left.bias is not None:
                    left.bias.mul_(c)
                right.weight.view(view.n_out, view.n_in, view.kernel).div_(c[None, :, None])
    return model


def assert_invariant(make, x, y, steps=6, lr=0.05, own_init=False, **kwargs):
    """The oracle on two models from `make()`; returns the optimizer of the first one.
    Weights are randomised (both signs, well conditioned) unless `own_init`; every forward
    pass of the two copies draws the same dropout masks."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model, twin = make().double(), make().double()
    for m in (model, twin):
        if not own_init:
            randomise(m, torch.Generator().manual_seed(0), low=0.3, high=1.0, positive=0.75)

    def forward(m, inputs, seed):
        torch.manual_seed(seed)
        return m(inputs)

    opt = quiet_gsgd(model, lr=lr, skeleton_init="keep", **kwargs)
    rescale_blocks(twin, opt.blocks, torch.Generator().manual_seed(1))
    twin_opt = quiet_gsgd(twin, lr=lr, skeleton_init="keep", **kwargs)
    assert [b.names for b in twin_opt.blocks] == [b.names for b in opt.blocks]
    with torch.no_grad():
        torch.testing.assert_close(forward(twin, x, 0), forward(model, x, 0), rtol=1e-10,
                                   atol=1e-10,
                                   msg="the rescaling G-SGD assumes changes the function")
    for k in range(steps):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(forward(m, x[k % 2::2], k + 1), y[k % 2::2]).backward()
            o.step()
        with torch.no_grad():
            torch.testing.assert_close(forward(twin, x, 0), forward(model, x, 0), rtol=1e-9,
                                       atol=1e-9, msg=f"step {k}")
    return opt
