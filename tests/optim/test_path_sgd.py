"""Tests of the exact Path-SGD optimizer against the brute-force path enumeration reference."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.models.convnets import BasicBlock, PlainNet, ResNet
from gsgd_cli.models.mlp import MLP
from gsgd_cli.optim.path_sgd import PathSGD, PathSGDStepError, needs_input_shape

from gsgd_cli.testing.helpers import Branchy, mlp
from gsgd_cli.testing.path_reference import brute_force_kappa, brute_force_path_norm_sq, count_paths

# every test runs with the fused CPU kernel and with the tensor operations (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("step_path")

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def randomise(model, seed, low=0.5, high=1.5):
    """Weights and biases of both signs with magnitudes in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            mag = low + (high - low) * torch.rand(p.shape, generator=gen, dtype=torch.float64)
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            p.copy_((mag * sign).to(p.dtype))
    return model


def conv_net(kind: str, bias: bool = True):
    """Tiny conv nets: (model, input_shape)."""
    C = lambda *a, **k: nn.Conv2d(*a, bias=bias, **k)  # noqa: E731
    L = lambda *a: nn.Linear(*a, bias=bias)  # noqa: E731
    if kind == "pad":
        net = nn.Sequential(C(1, 2, 3, padding=1), nn.ReLU(), C(2, 2, 3, padding=1), nn.ReLU(),
                            nn.Flatten(), L(32, 3))
        shape = (1, 4, 4)
    elif kind == "stride":
        net = nn.Sequential(C(1, 2, 3, padding=1), nn.ReLU(), C(2, 3, 3, padding=1, stride=2),
                            nn.ReLU(), nn.Flatten(), L(12, 2))
        shape = (1, 4, 4)
    elif kind == "avgpool":
        net = nn.Sequential(C(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                            C(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), L(12, 2))
        shape = (2, 4, 4)
    elif kind == "gap":
        net = nn.Sequential(C(1, 3, 3, padding=1), nn.ReLU(), C(3, 2, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), L(2, 3))
        shape = (1, 4, 4)
    elif kind == "pool-options":
        net = nn.Sequential(C(1, 2, 3, padding=1), nn.ReLU(),
                            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                         count_include_pad=False),
                            C(2, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(),
                            L(4, 2))
        shape = (1, 5, 5)
    elif kind == "pad-include":
        net = nn.Sequential(C(1, 2, 2), nn.ReLU(), nn.AvgPool2d(2, stride=1, padding=1),
                            nn.Dropout(0.5), C(2, 2, 3, stride=2), nn.ReLU(), nn.Flatten(),
                            L(2, 2))
        shape = (1, 4, 4)
    elif kind == "dilation-groups":
        net = nn.Sequential(C(2, 4, 3, padding=2, dilation=2), nn.ReLU(),
                            C(4, 2, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), L(18, 2))
        shape = (2, 3, 3)
    else:  # pragma: no cover
        raise KeyError(kind)
    return net.double(), shape


class FunctionalNet(nn.Module):
    """Same function as `conv_net('avgpool'/'gap'-like)`, written with functional calls."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.avg_pool2d(x, 2)
        x = F.dropout(x, 0.5)  # training=True by default: must be the identity in the copy
        x = torch.relu(self.c2(x)).relu()
        x = x.mean((2, 3))
        return self.fc(torch.flatten(x, 1))

    def as_sequential(self):
        return nn.Sequential(self.c1, nn.ReLU(), nn.AvgPool2d(2), self.c2, nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.fc)


def max_rel_err(opt, kappas, reference):
    worst = 0.0
    for name, k in zip(opt._param_names, kappas):
        ref = reference[name]
        worst = max(worst, float((k.to(torch.float64) - ref).abs().max() / ref.abs().max()))
    return worst


def param_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def rescale_hidden(model, seed, low=0.2, high=5.0):
    """g(w): scale each hidden unit/channel's incoming weights and bias by c > 0, outgoing by 1/c.

    Handles Linear->Linear, Conv->Conv (groups=1) and Conv->(pool, flatten)->Linear.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = param_layers(model)
    with torch.no_grad():
        for a, b in zip(layers[:-1], layers[1:]):
            n = a.weight.shape[0]
            c = (low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64))
            c = c.to(a.weight.dtype)
            a.weight.mul_(c.reshape(-1, *([1] * (a.weight.dim() - 1))))
            if a.bias is not None:
                a.bias.mul_(c)
            if isinstance(b, nn.Conv2d):
                b.weight.div_(c.reshape(1, -1, 1, 1))
            else:
                b.weight.div_(c.repeat_interleave(b.in_features // n).reshape(1, -1))
    return model


# --------------------------------------------------------------------------------------------
# kappa equals the brute-force sum over enumerated paths
# --------------------------------------------------------------------------------------------
PROFILES = {
    "shallow": [4, 3, 2],
    "equal": [3, 4, 4, 2],
    "increasing": [2, 2, 3, 5, 2],
    "decreasing": [4, 5, 3, 2, 2],
    "peak": [3, 2, 5, 3, 2],
}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_kappa_equals_brute_force_mlp(profile, bias):
    widths = PROFILES[profile]
    model = randomise(mlp(widths, bias), seed=len(widths) + 10 * bias)
    opt = PathSGD(model, lr=0.1)
    err = max_rel_err(opt, opt.compute_kappa(), brute_force_kappa(model, (widths[0],)))
    assert err < 1e-10


def test_kappa_equals_brute_force_on_the_real_mlp_model():
    torch.manual_seed(0)
    model = MLP(3, 2, width=3, depth=3, bias=True).double()
    randomise(model, seed=3)
    opt = PathSGD(model, lr=0.1)  # input shape inferred from the first Linear
    err = max_rel_err(opt, opt.compute_kappa(), brute_force_kappa(model, (3,)))
    assert err < 1e-10


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind", ["pad", "stride", "avgpool", "gap", "pool-options",
                                  "pad-include", "dilation-groups"])
def test_kappa_equals_brute_force_conv(kind, bias):
    model, shape = conv_net(kind, bias)
    randomise(model, seed=sum(map(ord, kind)))  # deterministic (str hash is salted)
    assert count_paths(model, shape) > 100  # the reference really enumerates paths
    opt = PathSGD(model, lr=0.1, input_shape=shape)
    err = max_rel_err(opt, opt.compute_kappa(), brute_force_kappa(model, shape))
    assert err < 1e-10


def test_kappa_equals_brute_force_functional_model():
    torch.manual_seed(1)
    model = randomise(FunctionalNet().double(), seed=7)
    opt = PathSGD(model, lr=0.1, input_shape=(1, 4, 4))
    seq_ref = brute_force_kappa(model.as_sequential(), (1, 4, 4))  # same parameter objects
    reference = dict(zip(opt._param_names, seq_ref.values()))
    assert list(reference) == ["c1.weight", "c1.bias", "c2.weight", "c2.bias", "fc.weight",
                               "fc.bias"]
    assert max_rel_err(opt, opt.compute_kappa(), reference) < 1e-10


@pytest.mark.parametrize("kind", ["resnet", "plain"])
def test_kappa_equals_brute_force_on_the_real_conv_models_without_bn(kind):
    """The project's ResNet (residual sums, identity and projection shortcuts, stride 2, global
    average pooling) and PlainNet, at tiny width, bn=False."""
    if kind == "resnet":
        model, shape = ResNet(1, 2, blocks=(1, 1), widths=(1, 1), bn=False), (1, 3, 3)
        assert isinstance(model[3], BasicBlock) and isinstance(model[3].shortcut, nn.Sequential)
    else:
        model, shape = PlainNet(1, 2, blocks=(1, 1), widths=(2, 2), bn=False), (1, 4, 4)
    model = randomise(model.double(), seed=31)
    opt = PathSGD(model, lr=0.1, input_shape=shape)
    err = max_rel_err(opt, opt.compute_kappa(), brute_force_kappa(model, shape))
    assert err < 1e-10


def test_kappa_depends_on_image_size():
    model, _ = conv_net("gap")
    randomise(model, seed=2)
    k4 = PathSGD(model, 0.1, input_shape=(1, 4, 4)).compute_kappa()
    k5 = PathSGD(model, 0.1, input_shape=(1, 5, 5)).compute_kappa()
    ref5 = brute_force_kappa(model, (1, 5, 5))
    assert not torch.allclose(k4[0], k5[0])
    assert torch.allclose(k5[0], ref5["0.weight"], rtol=1e-10, atol=0)


def test_path_norm_identity_on_bias_free_mlp():
    """Each path crosses every layer once: sum_e kappa_e w_e^2 over one layer = phi^2."""
    model = randomise(mlp([3, 4, 2, 2], bias=False), seed=5)
    opt = PathSGD(model, lr=0.1)
    phi2 = brute_force_path_norm_sq(model, (3,))
    for k, p in zip(opt.compute_kappa(), model.parameters()):
        assert math.isclose(float((k * p.detach() ** 2).sum()), phi2, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _data(shape, n=8, classes=2, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


@pytest.mark.parametrize("model_kind", ["mlp-bias", "conv-avgpool"])
def test_each_step_equals_brute_force_update(model_kind):
    """Several steps, then every step equals -lr * g / kappa_bruteforce at the current weights
    (kappa is recomputed each step and never accumulated)."""
    if model_kind == "mlp-bias":
        model, shape = randomise(mlp([3, 4, 3, 2], bias=True), seed=4), (3,)
    else:
        model, shape = conv_net("avgpool")
        randomise(model, seed=4)
    x, y = _data(shape)
    lr = 0.05
    opt = PathSGD(model, lr=lr, input_shape=shape)
    for step in range(4):
        ref = brute_force_kappa(model, shape)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        _loss(model, x, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            expected = before[n] - lr * grads[n] / ref[n]
            scale = (lr * grads[n] / ref[n]).abs().max()
            assert float((p.detach() - expected).abs().max()) <= 1e-10 * float(scale), (step, n)
            assert torch.equal(p.grad, grads[n])  # step never modifies .grad


def _outputs_along_trajectory(model, make_opt, x, y, steps):
    opt = make_opt(model)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        with torch.no_grad():
            outs.append(model(x).clone())
    return outs


@pytest.mark.parametrize("model_kind", ["mlp-bias", "mlp-nobias", "conv-avgpool", "conv-gap"])
def test_invariance_same_function_from_w_and_rescaled_w_sgd_drifts(model_kind):
    if model_kind.startswith("mlp"):
        shape = (4,)
        model = randomise(mlp([4, 5, 3, 4, 3], bias=model_kind == "mlp-bias"), seed=11)
    else:
        model, shape = conv_net("avgpool" if model_kind == "conv-avgpool" else "gap")
        randomise(model, seed=12)
    x, y = _data(shape, n=16, classes=2 if model_kind == "conv-avgpool" else 3)
    rescaled = rescale_hidden(copy.deepcopy(model), seed=13)
    with torch.no_grad():  # g(w) is the same function, with different weights
        assert torch.allclose(model(x), rescaled(x), rtol=0, atol=1e-12)
        assert max(float((a - b).abs().max()) for a, b in
                   zip(model.parameters(), rescaled.parameters())) > 0.5

    steps, lr = 20, 0.05
    path = lambda m: PathSGD(m, lr=lr, input_shape=shape)  # noqa: E731
    out_w = _outputs_along_trajectory(copy.deepcopy(model), path, x, y, steps)
    out_g = _outputs_along_trajectory(copy.deepcopy(rescaled), path, x, y, steps)
    for t, (a, b) in enumerate(zip(out_w, out_g)):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(a.abs().max())), t
    assert float((out_w[0] - out_w[-1]).abs().max()) > 1e-2  # the trajectory really moves

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    sgd_w = _outputs_along_trajectory(copy.deepcopy(model), sgd, x, y, steps)
    sgd_g = _outputs_along_trajectory(copy.deepcopy(rescaled), sgd, x, y, steps)
    assert float((sgd_w[-1] - sgd_g[-1]).abs().max()) > 1e-3


def _rescale_resnet_internal_channels(model, seed, low=0.2, high=5.0):
    """g(w) for a bn-free ResNet: scale each block's internal channels (body.0 out, body.2 in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, BasicBlock):
                a, b = block.body[0], block.body[2]
                c = low + (high - low) * torch.rand(a.out_channels, generator=gen,
                                                    dtype=torch.float64)
                a.weight.mul_(c.reshape(-1, 1, 1, 1))
                b.weight.div_(c.reshape(1, -1, 1, 1))
    return model


def test_invariance_on_the_real_resnet_without_bn():
    model = ResNet(1, 3, blocks=(1, 1), widths=(2, 3), bn=False).double()
    shape = (1, 4, 4)
    x, y = _data(shape, n=16, classes=3)
    rescaled = _rescale_resnet_internal_channels(copy.deepcopy(model), seed=17)
    with torch.no_grad():
        assert torch.allclose(model(x), rescaled(x), rtol=1e-12, atol=1e-12)
    steps, lr = 20, 0.05
    path = lambda m: PathSGD(m, lr=lr, input_shape=shape)  # noqa: E731
    out_w = _outputs_along_trajectory(copy.deepcopy(model), path, x, y, steps)
    out_g = _outputs_along_trajectory(copy.deepcopy(rescaled), path, x, y, steps)
    for t, (a, b) in enumerate(zip(out_w, out_g)):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(a.abs().max())), t
    assert float((out_w[0] - out_w[-1]).abs().max()) > 1e-2
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    sgd_w = _outputs_along_trajectory(copy.deepcopy(model), sgd, x, y, steps)
    sgd_g = _outputs_along_trajectory(copy.deepcopy(rescaled), sgd, x, y, steps)
    assert float((sgd_w[-1] - sgd_g[-1]).abs().max()) > 1e-3


def test_training_lowers_the_loss_float32():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    teacher = torch.randn(10, 3, generator=gen)
    y = (x @ teacher).argmax(1)
    model = MLP(10, 3, width=16, depth=2, bias=True)
    opt = PathSGD(model, lr=0.1)
    first = _loss(model, x, y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
    last = _loss(model, x, y).item()
    assert model[1].weight.dtype == torch.float32
    assert last < 0.25 * first, (first, last)
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_float32_kappa_close_to_float64_reference():
    model, shape = conv_net("avgpool")
    randomise(model, seed=21)
    ref = brute_force_kappa(model, shape)
    model32 = copy.deepcopy(model).float()
    opt = PathSGD(model32, lr=0.1, input_shape=shape)
    kappas = opt.compute_kappa()
    assert all(k.dtype == torch.float32 for k in kappas)
    assert max_rel_err(opt, kappas, ref) < 1e-5


def test_model_cast_after_construction_is_followed():
    model = randomise(mlp([3, 4, 2], bias=True, dtype=torch.float32), seed=1)
    opt = PathSGD(model, lr=0.1)
    model.double()
    x, y = _data((3,))
    _loss(model, x, y).backward()
    opt.step()
    err = max_rel_err(opt, opt.compute_kappa(), brute_force_kappa(model, (3,)))
    assert opt.compute_kappa()[0].dtype == torch.float64 and err < 1e-10


def test_closure_is_called_and_its_loss_returned():
    model = randomise(mlp([3, 4, 2], bias=True), seed=2)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_none_grads_are_skipped_and_no_grad_step_is_a_no_op():
    model = randomise(mlp([3, 4, 2], bias=True), seed=3)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None  # no gradients at all
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _loss(model, x, y).backward()
    model[0].bias.grad = None
    opt.step()
    assert model[0].bias.grad is None  # step never creates or modifies gradients
    assert torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[0].weight, before[0])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_one_param_group_in_model_parameters_order():
    model = MLP(4, 3, width=5, depth=2, bias=True)
    opt = PathSGD(model, lr=0.1)
    assert len(opt.param_groups) == 1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="one param group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _train(opt, model, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("rescale", [None, "first"])
def test_state_dict_round_trip_continues_identically(rescale):
    model = randomise(mlp([3, 4, 3, 2], bias=True), seed=8)
    x, y = _data((3,), n=16)
    opt = PathSGD(model, lr=0.05, rescale=rescale)
    _train(opt, model, x, y, 5)
    opt.param_groups[0]["lr"] = 0.03  # a changed lr must survive too
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(opt, model, x, y, 5)

    model2 = mlp([3, 4, 3, 2], bias=True)
    model2.load_state_dict(saved_model)
    opt2 = PathSGD(model2, lr=0.5, rescale=None)  # hyperparameters come from the state_dict
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.03 and opt2.param_groups[0]["rescale"] == rescale
    _train(opt2, model2, x, y, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_scheduler_changes_the_lr_used():
    model = randomise(mlp([3, 4, 2], bias=True), seed=9)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    _train(opt, model, x, y, 1)
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.01)
    opt.zero_grad()
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    kappas = opt.compute_kappa()
    opt.step()
    for p, b, k in zip(model.parameters(), before, kappas):
        assert torch.allclose(p.detach(), b - 0.01 * p.grad / k, rtol=0, atol=1e-14)


def test_rescale_every_matches_the_sgd_step_norm_and_first_freezes_the_ratio():
    model = randomise(mlp([3, 4, 2], bias=True), seed=10)
    x, y = _data((3,))
    lr = 0.01
    for mode in ("every", "first"):
        m = copy.deepcopy(model)
        opt = PathSGD(m, lr=lr, rescale=mode)
        ratios = []
        for _ in range(3):
            opt.zero_grad()
            _loss(m, x, y).backward()
            g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
            u = torch.cat([(p.grad / k).reshape(-1)
                           for p, k in zip(m.parameters(), opt.compute_kappa())])
            before = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
            opt.step()
            after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
            step = before - after
            ratio = float(step.norm() / (lr * u.norm()))
            ratios.append(ratio)
            # direction is always the Path-SGD direction
            assert torch.allclose(step / step.norm(), u / u.norm(), atol=1e-12)
            if mode == "every":
                assert math.isclose(float(step.norm()), lr * float(g.norm()), rel_tol=1e-10)
        if mode == "first":
            assert ratios[0] != 1.0
            assert all(math.isclose(r, ratios[0], rel_tol=1e-10) for r in ratios)


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------
def test_zero_kappa_with_zero_gradient_is_a_zero_step():
    """An all-zero layer: every path through layer 0 has a zero weight, so its kappa and its
    gradient are 0 and it does not move; the zero layer itself takes its Path-SGD step."""
    model = randomise(mlp([3, 4, 2], bias=False), seed=12)
    with torch.no_grad():
        model[2].weight.zero_()
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1)
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert torch.equal(model[0].weight, before[0])
    assert not torch.equal(model[2].weight, before[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _raises_at_once_or_later(opt, model, strict, error=PathSGDStepError, match=None):
    """strict: the failing step raises; else it writes nothing and check_steps() raises."""
    before = [p.detach().clone() for p in model.parameters()]
    if strict:
        with pytest.raises(error, match=match) as info:
            opt.step()
    else:
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        with pytest.raises(error, match=match) as info:
            opt.check_steps()
    assert (info.value.step, info.value.steps_after) == (1, 0)
    return info


STRICT_OR_DEFERRED = pytest.mark.parametrize("strict", [True, False], ids=["strict", "deferred"])


@STRICT_OR_DEFERRED
def test_zero_kappa_with_a_non_zero_gradient_raises_and_writes_nothing(strict):
    model = randomise(mlp([3, 4, 2], bias=False), seed=12)
    with torch.no_grad():
        model[2].weight.zero_()
    opt = PathSGD(model, lr=0.1, strict=strict)
    for p in model.parameters():
        p.grad = torch.ones_like(p)           # not a gradient of this model's loss
    before = [p.detach().clone() for p in model.parameters()]
    msg = ("PathSGD: kappa is 0 but the gradient is not for 12 of 12 entries of parameter "
           "'0.weight' (4, 3): no path with non-zero weights runs through them, so that "
           "gradient did not come from backpropagating through this model. Check what sets "
           ".grad, or pass eps > 0 to divide by kappa + eps (not exactly invariant).")
    info = _raises_at_once_or_later(opt, model, strict)
    assert str(info.value) == msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    PathSGD(model, lr=0.1, eps=1e-8).step()  # eps > 0: finite step
    assert all(torch.isfinite(p).all() for p in model.parameters())


@STRICT_OR_DEFERRED
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_raises_and_writes_nothing(bad, strict):
    model = randomise(mlp([3, 4, 2], bias=True), seed=13)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1, strict=strict)
    _loss(model, x, y).backward()
    model[2].bias.grad[0] = bad
    before = [p.detach().clone() for p in model.parameters()]
    _raises_at_once_or_later(opt, model, strict, match=r"^PathSGD: non-finite update for "
                             r"parameter '2\.bias' \(2,\): its gradient is not finite\.")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@STRICT_OR_DEFERRED
def test_an_overflowing_lr_times_update_raises_and_writes_nothing(strict):
    # the guard covered dw / kappa only: lr * dw / kappa overflowing float32 wrote inf into
    # the weights without an error
    model = randomise(mlp([3, 4, 2], bias=True), seed=13).float()
    x, y = _data((3,))
    opt = PathSGD(model, lr=3.3e38, strict=strict)
    _loss(model, x.float(), y).backward()
    for p in model.parameters():
        p.grad.mul_(1e3)                   # |dw / kappa| > 1: lr * dw / kappa > float32 max
    before = [p.detach().clone() for p in model.parameters()]
    _raises_at_once_or_later(opt, model, strict, match=r"^PathSGD: non-finite update for "
                             r"parameter .*: lr \* gradient / kappa is not finite")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")),
                                        ("eps", float("nan"))])
def test_a_non_finite_number_set_in_the_group_is_refused_at_the_step(key, value):
    # it wrote NaN/inf into every weight without an error
    model = randomise(mlp([3, 4, 2], bias=True), seed=13)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1)
    opt.param_groups[0][key] = value
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^PathSGD: param_groups\[0\]\['{key}'\] = "
                                         rf"{value} is not a finite number"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_steps_after_a_failed_one_write_nothing_until_it_is_raised(monkeypatch):
    model = randomise(mlp([3, 4, 2], bias=True), seed=13)
    x, y = _data((3,))
    opt = PathSGD(model, lr=0.1, rescale="first")
    _loss(model, x, y).backward()
    good = [p.grad.clone() for p in model.parameters()]
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()                                        # fails: recorded, nothing written
    monkeypatch.setattr(opt._step_record, "visible_failure", lambda: False)   # e.g. CUDA, later
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), good):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(PathSGDStepError, match=r"'0\.weight' \(4, 3\): its gradient is not "
                                               r"finite\..*This was step 1; the 1 step\(s\) "
                                               r"after it wrote nothing either"):
        opt.check_steps()
    opt.step()                                        # writes again; the frozen ratio is
    assert not torch.equal(model[0].weight, before[0])   # that of this first good step
    assert torch.isfinite(opt.state[model[0].weight]["rescale_ratio"])


def test_the_step_never_reads_a_device_value():
    # meta tensors have no values: .item()/bool() on them raise, so this step never syncs
    with torch.device("meta"):
        model = mlp([3, 4, 2], bias=True)
    opt = PathSGD(model, lr=0.1, rescale="first", eps=1e-6)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert opt._step_record.device.type == "meta"


# --------------------------------------------------------------------------------------------
# Arguments and unsupported models
# --------------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (dict(lr=-1), "Invalid lr=-1. Must be a finite number > 0."),
    (dict(lr=float("nan")), "Invalid lr=nan. Must be a finite number > 0."),
    (dict(lr="0.1"), "Invalid lr='0.1'. Must be a finite number > 0."),
    (dict(lr=True), "Invalid lr=True. Must be a finite number > 0."),
    (dict(lr=0), "Invalid lr=0. Must be a finite number > 0."),
    (dict(lr=float("inf")), "Invalid lr=inf. Must be a finite number > 0."),
    (dict(eps=-1e-3), "Invalid eps=-0.001. Must be a finite number >= 0."),
    (dict(eps=float("inf")), "Invalid eps=inf. Must be a finite number >= 0."),
    (dict(rescale="norm"), "Invalid rescale='norm'. Must be None, 'first' or 'every'."),
    (dict(rescale=True), "Invalid rescale=True. Must be None, 'first' or 'every'."),
    (dict(input_shape=(0, 4)), "Invalid input_shape=(0, 4). Must be a non-empty sequence of "
     "positive integers (the input shape without the batch dimension)."),
    (dict(input_shape="3"), "Invalid input_shape='3'. Must be a non-empty sequence of positive "
     "integers (the input shape without the batch dimension)."),
    (dict(input_shape=()), "Invalid input_shape=(). Must be a non-empty sequence of positive "
     "integers (the input shape without the batch dimension)."),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS, ids=[str(k) for k, _ in BAD_ARGUMENTS])
def test_bad_arguments(kwargs, message):
    model = mlp([3, 4, 2], bias=True)
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError) as info:
        PathSGD(model, **kwargs)
    assert str(info.value) == message


def test_parameters_instead_of_model_is_refused():
    model = mlp([3, 4, 2], bias=True)
    with pytest.raises(TypeError) as info:
        PathSGD(model.parameters(), lr=0.1)
    assert str(info.value) == ("Invalid model=generator. Must be a torch.nn.Module (PathSGD "
                               "takes the model, not its parameters).")


def test_wrong_input_shape_is_reported():
    model, _ = conv_net("pad")
    with pytest.raises(ValueError, match=r"could not run the squared-weight copy on an all-ones "
                                         r"input of shape \(1, \*\(1, 5, 5\)\)"):
        PathSGD(model, lr=0.1, input_shape=(1, 5, 5))


class _SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class _RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return F.linear(x, self.w)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(F.relu(self.a(x)))


UNSUPPORTED = [
    ("bn", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8, 2)),
     "PathSGD does not support normalisation: module '1' (BatchNorm2d): its output is not a sum "
     "over paths of weight products, so the squared-weight construction does not give the path "
     "norm; remove it or use another optimizer"),
    ("plain-bn", lambda: PlainNet(3, 10, blocks=(1, 1), widths=(4, 8), bn=True),
     "PathSGD does not support normalisation: module '1' (BatchNorm2d): its output is not a sum "
     "over paths of weight products, so the squared-weight construction does not give the path "
     "norm; remove it or use another optimizer"),
    ("resnet-bn", lambda: ResNet(3, 10, blocks=(1, 1), widths=(4, 8), bn=True),
     "PathSGD does not support normalisation: module '1' (BatchNorm2d): its output is not a sum "
     "over paths of weight products, so the squared-weight construction does not give the path "
     "norm; remove it or use another optimizer"),
    ("maxpool", lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(8, 2)),
     "PathSGD does not support max pooling: module '2' (MaxPool2d): which input it passes "
     "depends on the data, so it has no fixed path structure; use average pooling or a strided "
     "convolution"),
    ("sigmoid", lambda: nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2)),
     "PathSGD does not support module '1' (Sigmoid): only ReLU, flatten, dropout, identity, "
     "average pooling and residual sums may join the Linear/Conv2d layers"),
    ("prelu", lambda: nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 2)),
     "PathSGD does not support module '1' (PReLU): it has parameters and is not nn.Linear or "
     "nn.Conv2d"),
    ("conv-no-shape", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(8, 2)),
     "PathSGD needs input_shape for this model (its first layer is not an nn.Linear reached by "
     "flatten/ReLU only, e.g. a conv net): pass input_shape=(C, H, W), the shape of one input "
     "without the batch dimension; kappa of a convolution depends on the image size."),
    ("shared", _SharedLinear,
     "PathSGD does not support module 'b' (Linear): its weight is shared with 'a.weight'"),
    ("raw-param", _RawParam,
     "PathSGD does not support attribute 'w': parameters or buffers used directly in forward "
     "(outside nn.Linear/nn.Conv2d) are not supported"),
    ("twice", _Twice,
     "PathSGD does not support module 'a' (Linear): it is applied more than once in forward"),
    ("scaled", lambda: nn.Sequential(nn.Linear(3, 3), nn.Hardtanh(), nn.Linear(3, 2)),
     "PathSGD does not support module '1' (Hardtanh): only ReLU, flatten, dropout, identity, "
     "average pooling and residual sums may join the Linear/Conv2d layers"),
    ("circular", lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")),
     "PathSGD does not support module '0' (Conv2d, padding_mode='circular'): only "
     "padding_mode='zeros' is supported"),
]


@pytest.mark.parametrize("make,message", [(m, s) for _, m, s in UNSUPPORTED],
                         ids=[n for n, _, _ in UNSUPPORTED])
def test_unsupported_models_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ValueError) as info:
        PathSGD(make(), lr=0.1)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_untraceable_model_is_refused():
    with pytest.raises(ValueError, match=r"^PathSGD cannot trace \w+ with torch\.fx"):
        PathSGD(Branchy(), lr=0.1)


def test_tensor_arithmetic_is_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) * 2.0

    with pytest.raises(ValueError, match=r"^PathSGD does not support function 'mul'"):
        PathSGD(Scaled(), lr=0.1)


def test_adding_a_constant_is_refused():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + 1.0

    with pytest.raises(ValueError) as info:
        PathSGD(Shifted(), lr=0.1)
    assert str(info.value) == (
        "PathSGD does not support function 'add': only the sum of two tensors (a residual "
        "connection) is supported, not adding a constant or scaling by alpha")


def test_needs_input_shape_helper():
    assert not needs_input_shape(MLP(4, 2))
    assert needs_input_shape(conv_net("pad")[0])
    # an MLP whose first op is pooling cannot have its input shape inferred either
    assert needs_input_shape(nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 2)))


def test_hydra_config_instantiates_path_sgd():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "optimizer" / "path_sgd.yaml")
    model = MLP(4, 2)
    opt = instantiate(cfg)(model)
    assert isinstance(opt, PathSGD) and opt.param_groups[0]["lr"] == cfg.lr
    conv, shape = conv_net("gap")
    assert isinstance(instantiate(cfg)(conv, input_shape=shape), PathSGD)  # as a trainer would
    cfg.input_shape = list(shape)
    assert isinstance(instantiate(cfg)(conv), PathSGD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu():
    model, shape = conv_net("avgpool")
    randomise(model, seed=14)
    x, y = _data(shape)
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        opt = PathSGD(m, lr=0.05, input_shape=shape)
        _train(opt, m, x.to(device), y.to(device), 3)
        results.append([p.detach().cpu() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
