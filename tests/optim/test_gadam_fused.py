"""GAdam's and GRMSprop's fused CPU kernel (native/gadam.py, gadam_step.cpp) against their eager
step: the same weights and state after several steps (float64, 1e-12 relative; float32 to its
rounding), the same refused steps with the same messages, and the eager step where the kernel
does not apply."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.models.convnets import BasicBlock
from gsgd_cli.optim import GAdam, GRMSprop, GSGDWarning, StepError
from gsgd_cli.optim.native import build
from gsgd_cli.testing.helpers import PROFILES, mlp, randomise

pytestmark = pytest.mark.skipif(build.library() is None,
                                reason="the fused CPU step cannot be built here")

OPTIONS = {
    "adam": (GAdam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6)),
    "adam-amsgrad-wd-bpr-maximize": (GAdam, dict(lr=0.02, amsgrad=True, weight_decay=0.05,
                                                 bpr=0.01, maximize=True)),
    "rmsprop": (GRMSprop, dict(lr=0.005)),
    "rmsprop-centered-momentum-wd-bpr": (GRMSprop, dict(lr=0.005, alpha=0.9, centered=True,
                                                        momentum=0.5, weight_decay=0.05,
                                                        bpr=0.01)),
}


def _pair(model, name, **extra):
    cls, kwargs = OPTIONS[name]
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        fused = cls(model, skeleton_init="keep", fused=True, **kwargs, **extra)
        eager = cls(twin, skeleton_init="keep", fused=False, **kwargs, **extra)
    return (model, fused), (twin, eager)


def _train(runs, x, y, steps):
    for step in range(steps):
        for model, opt in runs:
            opt.zero_grad()
            F.cross_entropy(model(x[step % 2::2]), y[step % 2::2]).backward()
            opt.step()


def _assert_equal(runs, rtol):
    (a, oa), (b, ob) = runs
    assert oa._native is True and ob._native is False
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        scale = max(float(q.detach().abs().max()), 1e-30)
        assert float((p.detach() - q.detach()).abs().max()) <= rtol * scale, name
        mine, theirs = oa.state.get(p, {}), ob.state.get(q, {})
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            scale = max(float(theirs[key].abs().max()), 1e-30)
            assert float((mine[key] - theirs[key]).abs().max()) <= rtol * scale, (name, key)


def _data(shape, classes=3, n=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, *shape, generator=gen, dtype=dtype),
            torch.randint(0, classes, (n,), generator=gen))


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("widths", [w for _, w in PROFILES], ids=[n for n, _ in PROFILES])
def test_fused_equals_eager_on_mlps(widths, bias, name):
    model = randomise(mlp(widths, bias), torch.Generator().manual_seed(1))
    runs = _pair(model, name)
    _train(runs, *_data((widths[0],), classes=widths[-1]), steps=5)
    _assert_equal(runs, 1e-12)


@pytest.mark.parametrize("name", OPTIONS)
def test_fused_equals_eager_on_conv_chains_residual_blocks_and_batch_norm(name):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), BasicBlock(3, 3, 1, False),
                          BasicBlock(3, 4, 2, True), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Conv2d(5, 4, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    randomise(model, torch.Generator().manual_seed(2), low=0.3, high=0.9)
    runs = _pair(model, name, input_shape=(2, 4, 4))
    assert len(runs[0][1].blocks) == 3
    _train(runs, *_data((2, 4, 4)), steps=4)
    _assert_equal(runs, 1e-12)


@pytest.mark.parametrize("name", ["adam", "rmsprop-centered-momentum-wd-bpr"])
def test_fused_equals_eager_in_float32(name):
    model = randomise(mlp([6, 16, 32, 8, 3], True, dtype=torch.float32),
                      torch.Generator().manual_seed(3))
    runs = _pair(model, name)
    _train(runs, *_data((6,), dtype=torch.float32), steps=5)
    _assert_equal(runs, 1e-4)


@pytest.mark.parametrize("where", ["2.weight", "0.bias"])
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_a_refused_step_is_refused_alike_and_writes_nothing(name, where):
    model = randomise(mlp([4, 5, 6, 3], True), torch.Generator().manual_seed(4))
    runs = _pair(model, name)
    x, y = _data((4,))
    _train(runs, x, y, steps=2)
    messages = []
    for model, opt in runs:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dict(model.named_parameters())[where].grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(StepError) as caught:
            opt.step()
        messages.append(str(caught.value))
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert messages[0] == messages[1] and "not finite" in messages[0]
    _train(runs, x, y, steps=2)                   # both continue alike
    _assert_equal(runs, 1e-12)


def test_a_vanishing_pivot_is_refused_alike():
    model = randomise(mlp([3, 4, 6, 2], True), torch.Generator().manual_seed(3))
    runs = _pair(model, "adam", min_pivot_ratio=2.0)
    x, y = _data((3,), classes=2)
    messages = []
    for model, opt in runs:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(StepError) as caught:
            opt.step()
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "pivot" in messages[0]


def test_channels_last_weights_take_the_eager_step():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1)).double()
    randomise(model, torch.Generator().manual_seed(5))
    model = model.to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = GAdam(model, lr=0.01, skeleton_init="keep")
    model(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert opt._native is False


@pytest.mark.parametrize("name", ["adam-amsgrad-wd-bpr-maximize",
                                  "rmsprop-centered-momentum-wd-bpr"])
def test_fused_equals_eager_on_layers_split_between_threads(name):
    """Layers above the kernel's parallel threshold (2**15 entries) on 2 threads: rows split
    between threads, column sums added up per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = randomise(mlp([200, 256, 300, 256, 200], True),
                          torch.Generator().manual_seed(6), low=0.05, high=0.15)
        runs = _pair(model, name)
        _train(runs, *_data((200,), classes=200), steps=3)
        _assert_equal(runs, 1e-12)
    finally:
        torch.set_num_threads(threads)


def test_the_fused_step_is_deterministic_on_two_threads():
    """Two runs from the same start give bit-identical weights (the per-thread column sums are
    added up in row order, whichever thread finishes first)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        finals = []
        for _ in range(2):
            model = randomise(mlp([200, 256, 300, 256, 200], True),
                              torch.Generator().manual_seed(6), low=0.05, high=0.15)
            (run, _eager) = _pair(model, "rmsprop-centered-momentum-wd-bpr")
            _train([run], *_data((200,), classes=200), steps=3)
            finals.append([p.detach().clone() for p in run[0].parameters()])
        assert all(torch.equal(p, q) for p, q in zip(*finals))
    finally:
        torch.set_num_threads(threads)
