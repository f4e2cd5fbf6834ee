"""Small builders shared by the G-space and G-SGD tests."""
from __future__ import annotations

import torch
from torch import nn

from . import gsgd_reference as ref

# (name, widths): equal, increasing, decreasing and single-peak profiles, deep and shallow
PROFILES = [
    ("shallow", [5, 3, 2]),
    ("equal", [3, 4, 4, 2]),
    ("equal-deep", [2, 3, 3, 3, 3, 2]),
    ("increasing", [3, 2, 4, 6, 2]),
    ("decreasing", [3, 6, 4, 2, 2]),
    ("peak", [4, 2, 5, 3, 2]),
    ("peak-plateau", [2, 3, 5, 5, 2, 3]),
    ("wide-io", [6, 2, 3, 5]),
]
VALLEYS = [[3, 5, 3, 6, 2], [4, 4, 2, 4, 2]]


def mlp(widths, bias, dtype=torch.float64):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def randomise(model, generator, low=0.5, high=1.5, positive=0.7):
    """Weights of both signs (a fraction `positive` of them > 0, so that few units are dead)
    with magnitudes in [low, high] (well conditioned)."""
    with torch.no_grad():
        for p in model.parameters():
            magnitude = low + (high - low) * torch.rand(p.shape, generator=generator,
                                                        dtype=p.dtype)
            sign = torch.where(torch.rand(p.shape, generator=generator) < positive, 1.0, -1.0)
            p.copy_(magnitude * sign.to(p.dtype))
    return model


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def as_reference_net(model) -> ref.Net:
    layers = linears(model)
    return ref.Net([m.weight.detach().clone() for m in layers],
                   [m.bias.detach().clone() if m.bias is not None else None for m in layers])


def flat_grad(model) -> torch.Tensor:
    parts = []
    for m in linears(model):
        parts.append(m.weight.grad.reshape(-1))
        if m.bias is not None:
            parts.append(m.bias.grad.reshape(-1))
    return torch.cat(parts)


def rescale_hidden(model, generator, low=0.2, high=5.0):
    """Apply a random positive rescaling g(w): hidden node n of each layer gets c_n > 0."""
    layers = linears(model)
    with torch.no_grad():
        for left, right in zip(layers[:-1], layers[1:]):
            c = low + (high - low) * torch.rand(left.out_features, generator=generator,
                                                dtype=left.weight.dtype)
            left.weight.mul_(c[:, None])
            if left.bias is not None:
                left.bias.mul_(c)
            right.weight.div_(c[None, :])
    return model


class Branchy(nn.Module):
    """A forward with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x
