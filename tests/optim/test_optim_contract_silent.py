"""Issue 20 (never silently different, round 2): conventions every optimizer built from a
model keeps, as torch.optim does. Runs over OPTIM_DB (the contract suite's table)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.optim import GSGDWarning
from gsgd_cli.testing.helpers import mlp, randomise
from gsgd_cli.testing.optim_db import OPTIM_DB

DB = pytest.mark.parametrize("info", OPTIM_DB, ids=[info.name for info in OPTIM_DB])
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])


def _data(n=12, features=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return make()


def _state_options(info, momentum):
    return info.state_options if momentum else {}


class FrozenBackbone(nn.Module):
    """The usual frozen feature extractor: its layers run under torch.no_grad()."""

    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 5, 3], bias=True)

    def forward(self, x):
        with torch.no_grad():
            x = self.body[1](self.body[0](x))
        return self.body[4](self.body[3](self.body[2](x)))


# ------------------------------------------------------------------------------------------
# point 1: a parameter whose .grad is None is never moved
# ------------------------------------------------------------------------------------------
@DB
@FUSED
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "stateful"])
def test_a_backbone_run_under_no_grad_is_not_moved(info, fused, momentum):
    x, y = _data()
    model = randomise(FrozenBackbone(), torch.Generator().manual_seed(0))
    opt = _quiet(lambda: info.make(model, fused=fused, **_state_options(info, momentum)))
    frozen = [p.detach().clone() for p in model.body[0].parameters()]
    trained = model.body[4].weight.detach().clone()
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
        assert model.body[0].weight.grad is None
        _quiet(opt.step)
    for p, q in zip(model.body[0].parameters(), frozen):
        assert torch.equal(p.detach(), q)
    assert not torch.equal(model.body[4].weight.detach(), trained)


@DB
@FUSED
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "stateful"])
def test_a_layer_whose_grads_are_set_to_none_is_not_moved(info, fused, momentum):
    x, y = _data()
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model, fused=fused, **_state_options(info, momentum)))
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
        if k == 1:
            kept = [p.detach().clone() for p in model[2].parameters()]
            for p in model[2].parameters():
                p.grad = None
            _quiet(opt.step)
            for p, q in zip(model[2].parameters(), kept):
                assert torch.equal(p.detach(), q)
        else:
            _quiet(opt.step)


def test_gsgd_leaves_a_block_with_missing_gradients_to_torch_sgd_and_says_so():
    # the rule GSGD chose: the block takes plain SGD from that step on (as a layer frozen
    # after construction), exactly torch.optim.SGD's step, with a warning naming the block
    info = next(i for i in OPTIM_DB if i.name == "gsgd")
    x, y = _data()
    model = randomise(FrozenBackbone(), torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    opt = info.make(model, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=info.lr, momentum=0.9)
    for k in range(3):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x[k % 2::2]), y[k % 2::2]).backward()
        if k == 0:
            with pytest.warns(GSGDWarning, match=r"no gradient \(\.grad is None\) to plain SGD"
                                                 r".*body\.0 -> body\.2 -> body\.4 "
                                                 r"\(no gradient: body\.0\.weight, "
                                                 r"body\.0\.bias\)"):
                opt.step()
        else:
            opt.step()
        sgd.step()
    assert opt.blocks == []
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)
