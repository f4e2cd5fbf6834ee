"""GSGD's momentum, weight decay and basis-path regularisation (BPR) against the dense
float64 reference and against autograd."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.optim.gsgd import GSGD

from gsgd_cli.testing.helpers import as_reference_net, flat_grad, linears, mlp, randomise

PROFILES = [[3, 4, 4, 2], [3, 2, 4, 6, 2], [4, 5, 3, 2]]


def _setup(widths, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = randomise(mlp(widths, bias), gen)
    x = torch.randn(12, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (12,), generator=gen)
    return model, x, y


def _assert_same(model, net, atol=1e-10):
    for layer, w, b in zip(linears(model), net.weights, net.biases):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=atol)
        if b is not None:
            torch.testing.assert_close(layer.bias.detach(), b, rtol=0, atol=atol)


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("widths", PROFILES, ids=str)
def test_momentum_matches_dense_v_space_heavy_ball_over_several_steps(widths, bias):
    model, x, y = _setup(widths, bias)
    opt = GSGD(model, lr=0.05, momentum=0.9, skeleton_init="keep")
    net, buffer = as_reference_net(model), None
    for k in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x[k::2]), y[k::2]).backward()
        net, buffer = ref.gsgd_step(net, flat_grad(model), 0.05, momentum=0.9, buffer=buffer)
        opt.step()
        _assert_same(model, net)


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_momentum_branch_reduces_to_the_plain_step_as_mu_goes_to_zero(bias):
    model, x, y = _setup([3, 2, 4, 6, 2], bias)
    plain = copy.deepcopy(model)
    opt = GSGD(model, lr=0.1, momentum=1e-300, skeleton_init="keep")   # momentum code path
    opt_plain = GSGD(plain, lr=0.1, skeleton_init="keep")
    for k in range(3):
        for m, o in ((model, opt), (plain, opt_plain)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert "momentum_buffer" in opt.state[linears(model)[0].weight]


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_weight_decay_and_bpr_match_the_reference(bias, momentum):
    model, x, y = _setup([4, 5, 3, 2], bias, seed=3)
    opt = GSGD(model, lr=0.05, momentum=momentum, weight_decay=1e-2, bpr=3e-2,
               skeleton_init="keep")
    net, buffer = as_reference_net(model), None
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        result = ref.gsgd_step(net, flat_grad(model), 0.05, momentum=momentum, buffer=buffer,
                               bpr=3e-2, weight_decay=1e-2)
        net, buffer = result if momentum else (result, None)
        opt.step()
        _assert_same(model, net)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_bpr_gradient_equals_autograd_of_the_regulariser_in_path_values(bias):
    """GSGD(bpr=lam) with zero loss gradient == GSGD(bpr=0) fed with autograd's gradient of
    lam * (sum_{P+} v^2 + sum_{P-} log|v|^2), v computed from the weights by the reference."""
    model, _, _ = _setup([3, 2, 4, 3], bias, seed=5)
    twin = copy.deepcopy(model)
    layers = linears(twin)
    net = ref.Net([m.weight for m in layers], [m.bias for m in layers])
    ref.bpr_value(net, 0.07).backward()
    GSGD(twin, lr=0.2, skeleton_init="keep").step()
    opt = GSGD(model, lr=0.2, bpr=0.07, skeleton_init="keep")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert any(float(p.grad.abs().max()) > 1e-3 for p in twin.parameters())


@pytest.mark.usefixtures("step_path")
def test_weight_decay_equals_adding_wd_times_w_to_the_gradient():
    model, x, y = _setup([3, 4, 4, 2], True, seed=7)
    twin = copy.deepcopy(model)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    with torch.no_grad():
        for p in twin.parameters():
            p.grad += 0.05 * p
    GSGD(model, lr=0.1, weight_decay=0.05, skeleton_init="keep").step()
    GSGD(twin, lr=0.1, skeleton_init="keep").step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("step_path")
def test_momentum_buffers_survive_a_state_dict_round_trip():
    model, x, y = _setup([3, 4, 4, 2], True, seed=8)
    opt = GSGD(model, lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    clone = mlp([3, 4, 4, 2], True)
    clone_opt = GSGD(clone, lr=0.05, momentum=0.9)
    clone.load_state_dict(saved[0])
    clone_opt.load_state_dict(saved[1])
    pivot_weight = linears(clone)[0].weight
    assert "pivot_momentum_buffer" in clone_opt.state[pivot_weight]
    for m, o in ((model, opt), (clone, clone_opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("step_path")
def test_outside_parameters_follow_torch_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning):
        opt = GSGD(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    for _ in range(4):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
