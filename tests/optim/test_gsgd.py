"""GSGD as a torch.optim optimizer: invariance under positive rescaling, fixed free weights,
state_dict, schedulers, None grads, dtypes, argument and step errors."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.gspace.skeleton import build_skeleton
from gsgd_cli.models.mlp import MLP
from gsgd_cli.optim.gsgd import GSGD, GSGDStepError

from gsgd_cli.testing.helpers import PROFILES, linears, mlp, randomise, rescale_hidden


def _data(widths, n=32, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=gen, dtype=dtype)
    y = torch.randint(0, widths[-1], (n,), generator=gen)
    return x, y


def _train(model, opt, x, y, steps, batch=8):
    outputs = []
    for k in range(steps):
        sl = slice((k * batch) % len(x), (k * batch) % len(x) + batch)
        opt.zero_grad()
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
        with torch.no_grad():
            outputs.append(model(x).clone())
    return outputs


def _skeleton_values(model):
    widths = [linears(model)[0].in_features] + [m.out_features for m in linears(model)]
    skeleton = build_skeleton(widths)
    free, pivots = [], []
    for layer, module in zip(skeleton.layers, linears(model)):
        values = module.weight.detach().reshape(-1)[layer.flat].clone()
        (pivots if layer.role == "pivot" else free).append(values)
    return free, pivots


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,widths", [PROFILES[1], PROFILES[3], PROFILES[4], PROFILES[5]],
                         ids=["equal", "increasing", "decreasing", "peak"])
@pytest.mark.usefixtures("step_path")
def test_invariance_gsgd_same_function_from_w_and_rescaled_w_sgd_drifts(name, widths, bias):
    gen = torch.Generator().manual_seed(1)
    model_a = randomise(mlp(widths, bias), gen)
    model_b = rescale_hidden(copy.deepcopy(model_a), gen)
    x, y = _data(widths)
    with torch.no_grad():   # g(w) computes the same function before training ...
        torch.testing.assert_close(model_a(x), model_b(x), rtol=0, atol=1e-12)
    # ... and G-SGD keeps it so at every one of 20 steps
    out_a = _train(model_a, GSGD(model_a, lr=0.1, skeleton_init="keep"), x, y, 20)
    out_b = _train(model_b, GSGD(model_b, lr=0.1, skeleton_init="keep"), x, y, 20)
    for step, (a, b) in enumerate(zip(out_a, out_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"step {step}")
    assert (out_a[-1] - out_a[0]).abs().max() > 1e-2          # training moved the function
    # plain SGD from the same pair drifts apart: the test can tell the difference
    sgd_a = copy.deepcopy(model_a)
    randomise(sgd_a, torch.Generator().manual_seed(1))
    sgd_b = rescale_hidden(copy.deepcopy(sgd_a), torch.Generator().manual_seed(2))
    out_a = _train(sgd_a, torch.optim.SGD(sgd_a.parameters(), lr=0.1), x, y, 20)
    out_b = _train(sgd_b, torch.optim.SGD(sgd_b.parameters(), lr=0.1), x, y, 20)
    assert (out_a[-1] - out_b[-1]).abs().max() > 1e-3


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("skeleton_init", ["one", "keep"])
def test_free_weights_are_bit_for_bit_unchanged(skeleton_init):
    gen = torch.Generator().manual_seed(3)
    widths = [4, 2, 5, 3, 2]
    model = randomise(mlp(widths, bias=True, dtype=torch.float32), gen)
    opt = GSGD(model, lr=0.05, skeleton_init=skeleton_init)
    free_before, pivots_before = _skeleton_values(model)
    if skeleton_init == "one":
        assert all(bool((v == 1).all()) for v in free_before + pivots_before)
    x, y = _data(widths, dtype=torch.float32)
    _train(model, opt, x, y, 10)
    free_after, pivots_after = _skeleton_values(model)
    for before, after in zip(free_before, free_after):
        assert torch.equal(before, after)
    assert not torch.equal(pivots_before[0], pivots_after[0])     # pivots do move


def test_default_skeleton_init_one_sets_pivots_and_free_weights_to_one():
    model = MLP(49, 10, width=8, depth=2)
    GSGD(model, lr=0.01)
    free, pivots = _skeleton_values(model)
    assert sum(v.numel() for v in free) == 16 and sum(v.numel() for v in pivots) == 8
    assert all(bool((v == 1).all()) for v in free + pivots)


@pytest.mark.usefixtures("step_path")
def test_state_dict_round_trip_continues_identically():
    widths = [6, 5, 5, 3]
    x, y = _data(widths)
    model = randomise(mlp(widths, bias=True), torch.Generator().manual_seed(4))
    opt = GSGD(model, lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(5):
        _train(model, opt, x, y, 1)
        sched.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    # a fresh model and optimizer: construct first (skeleton_init resets), then load
    clone = mlp(widths, bias=True)
    clone_opt = GSGD(clone, lr=123.0)
    clone_sched = torch.optim.lr_scheduler.StepLR(clone_opt, step_size=3, gamma=0.5)
    clone.load_state_dict(saved[0])
    clone_opt.load_state_dict(saved[1])
    clone_sched.load_state_dict(saved[2])
    assert clone_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(4):
        out = _train(model, opt, x, y, 1)[-1]
        clone_out = _train(clone, clone_opt, x, y, 1)[-1]
        sched.step()
        clone_sched.step()
        assert torch.equal(out, clone_out)


@pytest.mark.usefixtures("step_path")
def test_scheduler_changes_the_step_size():
    widths = [4, 4, 4, 2]
    x, y = _data(widths)
    base = randomise(mlp(widths, bias=False), torch.Generator().manual_seed(5))

    def delta_after(lr_factor):
        model = copy.deepcopy(base)
        opt = GSGD(model, lr=0.1, skeleton_init="keep")
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=lr_factor)
        _train(model, opt, x, y, 1)
        sched.step()
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, x, y, 1)
        return opt.param_groups[0]["lr"], sum(float((p.detach() - b).abs().sum())
                                              for p, b in zip(model.parameters(), before))

    lr_full, moved_full = delta_after(1.0)
    lr_small, moved_small = delta_after(0.01)
    assert lr_full == pytest.approx(0.1) and lr_small == pytest.approx(0.001)
    assert moved_small < 0.05 * moved_full


@pytest.mark.usefixtures("step_path")
def test_none_grads_and_layers_outside_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
            self.unused = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.body(x) * self.scale

    model = Net().double()
    opt = GSGD(model, lr=0.1)
    unused_before = model.unused.weight.detach().clone()
    scale_before = model.scale.detach().clone()
    opt.step()                                  # no grads at all: nothing moves
    x, y = _data([4, 3])
    F.cross_entropy(model(x), y).backward()
    expected_scale = scale_before - 0.1 * model.scale.grad
    opt.step()
    assert torch.equal(model.unused.weight.detach(), unused_before)     # grad stayed None
    torch.testing.assert_close(model.scale.detach(), expected_scale)    # plain SGD outside
    assert [b.names for b in opt.blocks] == [["body.0", "body.2"]]


@pytest.mark.usefixtures("step_path")
def test_float32_training_lowers_the_loss():
    torch.manual_seed(0)
    model = MLP(10, 3, width=16, depth=2, bias=True)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = GSGD(model, lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model[1].weight.dtype == torch.float32
    assert losses[-1] < 0.6 * losses[0]


def test_closure_is_called_and_its_loss_returned():
    model = mlp([3, 3, 2], bias=False)
    x, y = _data([3, 3, 2])
    opt = GSGD(model, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)


BAD_ARGUMENTS = [
    (dict(lr=-0.1), ValueError, r"Invalid lr=-0.1. Must be a finite number > 0."),
    (dict(lr=0), ValueError, r"Invalid lr=0. Must be a finite number > 0."),
    (dict(lr="fast"), ValueError, r"Invalid lr='fast'. Must be a finite number > 0."),
    (dict(lr=float("inf")), ValueError, r"Invalid lr=inf. Must be a finite number > 0."),
    (dict(lr=float("nan")), ValueError, r"Invalid lr=nan. Must be a finite number > 0."),
    (dict(lr=0.1, skeleton_init="random"), ValueError,
     r"Invalid skeleton_init='random'. Must be one of 'one', 'keep', 'rescale'."),
    (dict(lr=0.1, momentum=1.0), ValueError, r"Invalid momentum=1.0. Must be a number in [0, 1)."),
    (dict(lr=0.1, momentum=-0.5), ValueError, r"Invalid momentum=-0.5. Must be a finite number >= 0."),
    (dict(lr=0.1, weight_decay=-1e-4), ValueError,
     r"Invalid weight_decay=-0.0001. Must be a finite number >= 0."),
    (dict(lr=0.1, bpr=None), ValueError, r"Invalid bpr=None. Must be a finite number >= 0."),
    (dict(lr=0.1, weight_decay=float("inf")), ValueError,
     r"Invalid weight_decay=inf. Must be a finite number >= 0."),
    (dict(lr=0.1, bn="ignore"), ValueError,
     r"Invalid bn='ignore'. Must be one of 'approx', 'approx_per_tap', 'split'."),
    (dict(lr=0.1, block_split="layer"), ValueError,
     r"Invalid block_split='layer'. Must be one of 'none', 'stage'."),
    (dict(lr=0.1, min_pivot_ratio=-1), ValueError,
     r"Invalid min_pivot_ratio=-1. Must be a finite number >= 0."),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS,
                         ids=[str(k) for k, _, _ in BAD_ARGUMENTS])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match="^" + re.escape(message.replace("\\", "")) + "$"):
        GSGD(mlp([3, 3, 2], bias=False), **kwargs)


def test_parameters_instead_of_model_is_refused():
    model = mlp([3, 3, 2], bias=False)
    with pytest.raises(TypeError, match=r"GSGD\(model, lr\) rather than"):
        GSGD(model.parameters(), lr=0.1)


def test_keep_with_zero_skeleton_weight_is_refused():
    model = mlp([3, 3, 2], bias=False)
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.raises(ValueError, match="layer '0' has a skeleton weight equal to 0"):
        GSGD(model, lr=0.1, skeleton_init="keep")


def _expect_step_error(opt, model, match, strict, step=1):
    """The step that fails writes nothing and raises (strict: at once; else at the next
    check_steps(), or at the next step() since the CPU sees the failure without waiting)."""
    before = [p.detach().clone() for p in model.parameters()]
    if strict:
        with pytest.raises(GSGDStepError, match=match) as info:
            opt.step()
    else:
        opt.step()                 # recorded on the device, not raised: no host sync
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p.detach(), b)
        with pytest.raises(GSGDStepError, match=match) as info:
            opt.check_steps()
    assert info.value.step == step and info.value.steps_after == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    opt.check_steps()              # raised once; the record is clear again
    return info.value


STRICT_OR_DEFERRED = pytest.mark.parametrize("strict", [True, False], ids=["strict", "deferred"])


@STRICT_OR_DEFERRED
@pytest.mark.usefixtures("step_path")
def test_pivot_falling_to_zero_raises_and_writes_nothing(strict):
    widths = [3, 4, 4, 2]
    x, y = _data(widths)
    model = randomise(mlp(widths, bias=False), torch.Generator().manual_seed(6))
    opt = GSGD(model, lr=1.0, skeleton_init="keep", strict=strict)
    F.cross_entropy(model(x), y).backward()
    # find the learning rate that sends pivot 0 exactly to zero: u' = u - lr * c, so lr = u / c
    probe = copy.deepcopy(model)
    probe_opt = GSGD(probe, lr=1.0, skeleton_init="keep")
    for p, q in zip(model.parameters(), probe.parameters()):
        q.grad = p.grad.clone()
    u = model[0].weight[0, 0].item()
    probe_opt.step()
    c = u - probe[0].weight[0, 0].item()
    opt.param_groups[0]["lr"] = u / c
    _expect_step_error(opt, model, r"step 1 failed in layer '0': pivot 0 would change by the "
                                   r"ratio .* lower the learning rate .* Nothing was updated",
                       strict)


@STRICT_OR_DEFERRED
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.usefixtures("step_path")
def test_non_finite_gradient_raises_naming_the_layer(bad, strict):
    model = mlp([3, 4, 4, 2], bias=True)
    opt = GSGD(model, lr=0.1, strict=strict)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[4].weight.grad[1, 2] = bad
    _expect_step_error(opt, model, "layer '4': its gradient is not finite", strict)
    model[4].weight.grad[1, 2] = 0.0
    model[2].bias.grad[1] = bad
    _expect_step_error(opt, model, "step 2 failed in layer '2': its bias gradient is not finite",
                       strict, step=2)


class ScaledChain(nn.Module):
    """A chain block and a parameter outside every block (`scale`)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x) * self.scale


@STRICT_OR_DEFERRED
@pytest.mark.usefixtures("step_path")
def test_non_finite_gradient_outside_the_blocks_raises_and_writes_nothing(strict):
    model = ScaledChain().double()
    opt = GSGD(model, lr=0.1, strict=strict)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.scale.grad[0] = float("nan")
    _expect_step_error(opt, model, r"parameter 'scale' \(plain SGD step outside the chain "
                                   r"blocks\): its gradient is not finite", strict)


@STRICT_OR_DEFERRED
@pytest.mark.usefixtures("step_path")
def test_a_failed_step_with_momentum_does_not_move_parameters_outside_the_blocks(strict):
    # deferred: the failed step kept the momentum buffers (mu -> 1, dw -> 0) but still stepped
    # the outside parameters along them
    model = ScaledChain().double()
    opt = GSGD(model, lr=0.1, momentum=0.9, strict=strict)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()                                      # non-zero momentum buffers
    model.scale.grad[0] = float("nan")
    _expect_step_error(opt, model, r"parameter 'scale' \(plain SGD step outside the chain "
                                   r"blocks\): its gradient is not finite", strict, step=2)


@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")),
                                        ("weight_decay", float("inf")),
                                        ("momentum", float("nan"))])
@pytest.mark.usefixtures("step_path")
def test_a_non_finite_number_set_in_the_group_is_refused_at_the_step(key, value):
    # deferred eager steps wrote it into the weights (NaN * a gated 0 is NaN)
    model = mlp([3, 4, 4, 2], bias=True)
    opt = GSGD(model, lr=0.1)
    opt.param_groups[0][key] = value
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^GSGD: param_groups\[0\]\['{key}'\] = {value} is "
                                         "not a finite number"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@STRICT_OR_DEFERRED
@pytest.mark.usefixtures("step_path")
def test_overflowing_coefficients_write_nothing(strict):
    # a tiny free weight makes 1/s^2 overflow in float32 while the weights are finite: the
    # gated (deferred) step must not compute 0 * inf = NaN into them
    widths = [3, 4, 4, 2]
    model = randomise(mlp(widths, bias=True, dtype=torch.float64), torch.Generator().manual_seed(9))
    with torch.no_grad():
        model[2].weight[0, 0] = 1e-30               # free skeleton weight of node 0
    model = model.float()
    opt = GSGD(model, lr=0.1, skeleton_init="keep", strict=strict)
    x, y = _data(widths, dtype=torch.float32)
    F.cross_entropy(model(x), y).backward()
    _expect_step_error(opt, model, "G-SGD step 1 failed in layer '0'", strict)


@pytest.mark.usefixtures("step_path")
def test_steps_after_a_failed_one_write_nothing_until_it_is_raised(monkeypatch):
    # a device that has not yet shown the failure to the host (CUDA a step or two later)
    widths = [3, 4, 4, 2]
    model = mlp(widths, bias=True)
    opt = GSGD(model, lr=0.1)
    x, y = _data(widths)
    F.cross_entropy(model(x), y).backward()
    good = {p: p.grad.clone() for p in model.parameters()}
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()                                               # step 1 fails
    monkeypatch.setattr(opt._step_record, "visible_failure", lambda: False)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = good[p].clone()
    opt.step()                                               # steps 2, 3: good gradients,
    opt.step()                                               # but written only after a raise
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    with pytest.raises(GSGDStepError, match=r"step 1 failed in layer '0': its gradient is not "
                                            r"finite; .* Nothing was updated by it or by the 2 "
                                            r"step\(s\) after it") as info:
        opt.check_steps()
    assert (info.value.step, info.value.steps_after) == (1, 2)
    opt.step()                                               # and then steps write again
    assert not torch.equal(model[0].weight.detach(), before[0])


def test_a_failure_is_raised_by_the_next_step_on_the_cpu():
    model = mlp([3, 4, 4, 2], bias=False)
    opt = GSGD(model, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].weight.grad[0, 1] = float("inf")
    opt.step()
    with pytest.raises(GSGDStepError, match="step 1 failed in layer '2'"):
        opt.step()


def test_no_chain_block_warns_and_falls_back_to_sgd():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="found no chain block"):
        GSGD(model, lr=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu():
    widths = [5, 6, 6, 3]
    x, y = _data(widths)
    cpu = randomise(mlp(widths, bias=True), torch.Generator().manual_seed(7))
    gpu = copy.deepcopy(cpu).cuda()
    out_cpu = _train(cpu, GSGD(cpu, lr=0.1), x, y, 5)
    out_gpu = _train(gpu, GSGD(gpu, lr=0.1), x.cuda(), y.cuda(), 5)
    torch.testing.assert_close(out_gpu[-1].cpu(), out_cpu[-1], rtol=0, atol=1e-9)


@STRICT_OR_DEFERRED
@pytest.mark.usefixtures("step_path")
def test_overflowing_update_raises_and_writes_nothing(strict):
    model = mlp([3, 4, 4, 2], bias=False, dtype=torch.float32)
    opt = GSGD(model, lr=1e10, strict=strict)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[0].weight.grad[1, 2] = 1e30      # a non-pivot entry of the pivot layer
    _expect_step_error(opt, model, "layer '0': the update is not finite", strict)


@pytest.mark.usefixtures("step_path")
def test_an_overflowing_lr_times_gradient_raises_where_coefficients_underflow():
    # lr 1e30 in float32: after one step 1/s^2 underflows to 0 and lr * dW overflows to inf;
    # the bound lr * max(1/s^2) * max|dW| is then 0, and the write inf * 0 was NaN, silently
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning):
        opt = GSGD(model, lr=1e30, strict=True)
    with pytest.raises(GSGDStepError, match="the update is not finite"):
        for _ in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.usefixtures("step_path")
def test_block_with_a_frozen_layer_is_left_to_plain_sgd():
    model = mlp([3, 4, 4, 2], bias=True)
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"frozen layers to plain SGD .*: 0 -> 2 -> 4"):
        opt = GSGD(model, lr=0.1)
    assert opt.blocks == []
    x, y = _data([3, 4, 4, 2])
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen_before)
    for p, b in zip(model.parameters(), before):
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)


def test_add_param_group_is_refused():
    opt = GSGD(mlp([3, 3, 2], bias=False), lr=0.1)
    with pytest.raises(ValueError, match="add_param_group is not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
