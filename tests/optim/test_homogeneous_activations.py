"""Issue 20: activations positively homogeneous of degree 1 (sigma(c x) = c sigma(x), c > 0)
keep G-SGD's rescaling invariance and join chains, each checked with the invariance oracle
(`gsgd_cli.testing.oracle`); ReLU6, hardtanh and clamp(0, 6) do not and stay outside."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.optim import PathSGD
from gsgd_cli.testing.oracle import assert_invariant, quiet_gsgd


def _xy(*shape, classes=3, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class FunctionalMLP(nn.Module):
    """4 -> 6 -> 6 -> 3 with a functional activation written in forward."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def act(self, x):
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, 0.2)
        if self.kind == "abs":
            return torch.abs(x)
        if self.kind == "abs_method":
            return x.abs()
        if self.kind == "clamp_min0":
            return torch.clamp(x, min=0)
        if self.kind == "clamp_method":
            return x.clamp(min=0)
        if self.kind == "clamp_min":
            return torch.clamp_min(x, 0)
        if self.kind == "threshold":
            return F.threshold(x, 0, 0)
        if self.kind == "relu_times_2":
            return F.relu(x) * 2.0
        if self.kind == "relu_over_3":
            return torch.relu(x) / 3
        if self.kind == "masked":
            return x * (x > 0)
        if self.kind == "masked_ge_first":
            return (x >= 0) * x
        if self.kind == "maximum_zeros":
            return torch.maximum(x, torch.zeros_like(x))
        if self.kind == "max_zeros_first":
            return torch.max(torch.zeros_like(x), x)
        if self.kind == "maximum_ones":
            return torch.maximum(x, torch.ones_like(x))
        if self.kind == "masked_half":
            return x * (x > 0.5)
        if self.kind == "threshold_half":
            return F.threshold(x, 0.5, 0.0)
        if self.kind == "relu6":
            return F.relu6(x)
        if self.kind == "hardtanh":
            return F.hardtanh(x)
        if self.kind == "clamp06":
            return torch.clamp(x, 0, 6)
        raise AssertionError(self.kind)

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


MODULES = {
    "Threshold(0,0)": lambda: nn.Threshold(0, 0),
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "PReLU": lambda: nn.PReLU(6),
    "PReLU-shared": lambda: nn.PReLU(),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_a_homogeneous_activation_module_joins_the_chain_exactly(name):
    def make():
        return nn.Sequential(nn.Linear(4, 6), MODULES[name](), nn.Linear(6, 6), MODULES[name](),
                             nn.Linear(6, 3))
    x, y = _xy(4)
    opt = assert_invariant(make, x, y)
    assert [b.names for b in opt.blocks] == [["0", "2", "4"]]
    if name.startswith("PReLU"):
        table = opt.describe()
        assert "outside: 1.weight" in table and "PReLU's slope" in table


@pytest.mark.parametrize("kind", ["leaky_relu", "abs", "abs_method", "clamp_min0",
                                  "clamp_method", "clamp_min", "threshold", "relu_times_2",
                                  "relu_over_3", "masked", "masked_ge_first", "maximum_zeros",
                                  "max_zeros_first"])
def test_a_homogeneous_activation_function_joins_the_chain_exactly(kind):
    x, y = _xy(4)
    opt = assert_invariant(lambda: FunctionalMLP(kind), x, y)
    assert [b.names for b in opt.blocks] == [["a", "b", "c"]]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_join_the_chain_exactly(mode):
    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.ReLU(),
                             nn.Conv2d(3, 3, 3, padding=1, padding_mode=mode), nn.ReLU(),
                             nn.Flatten(), nn.Linear(48, 3))
    x, y = _xy(2, 4, 4)
    opt = assert_invariant(make, x, y, input_shape=(2, 4, 4))
    assert [b.names for b in opt.blocks] == [["0", "2", "5"]]


@pytest.mark.parametrize("how", ["nearest", "bilinear", "functional"])
def test_upsampling_joins_the_chain_exactly(how):
    up = (Act(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"))
          if how == "functional" else None)

    def make():
        layer = up if up is not None else nn.Upsample(scale_factor=2, mode=how)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), layer,
                             nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 16, 3))
    x, y = _xy(2, 2, 2)
    opt = assert_invariant(make, x, y, input_shape=(2, 2, 2))
    assert [b.names for b in opt.blocks] == [["0", "3", "6"]]


@pytest.mark.parametrize("kind", ["relu6", "hardtanh", "clamp06", "threshold_half",
                                  "masked_half", "maximum_ones"])
def test_bounded_activations_stay_outside(kind):
    opt = quiet_gsgd(FunctionalMLP(kind).double(), lr=0.1, skeleton_init="keep")
    assert opt.blocks == []
    if kind not in ("masked_half", "maximum_ones"):   # x used twice, and not as ReLU
        assert "it is followed by" in opt.describe()


@pytest.mark.parametrize("make", [lambda: nn.ReLU6(), lambda: nn.Hardtanh(),
                                  lambda: nn.Threshold(0.5, 0.0)],
                         ids=["ReLU6", "Hardtanh", "Threshold(0.5,0)"])
def test_bounded_activation_modules_stay_outside(make):
    model = nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 3)).double()
    assert quiet_gsgd(model, lr=0.1, skeleton_init="keep").blocks == []


@pytest.mark.parametrize("make", [lambda: nn.LeakyReLU(0.1), lambda: nn.PReLU(6)],
                         ids=["LeakyReLU", "PReLU"])
def test_path_sgd_keeps_to_relu_networks(make):
    model = nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="PathSGD does not support"):
        PathSGD(model, lr=0.05)
