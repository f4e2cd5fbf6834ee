"""Smoke: Plain-34 and ResNet-34 (full size, CIFAR form), with and without batch norm, take
training steps with each optimizer on synthetic CIFAR-shaped data on the CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gsgd_cli.models import PlainNet, ResNet
from gsgd_cli.optim.gsgd import GSGD
from gsgd_cli.optim.path_sgd import PathSGD

MODELS = {"plain34": PlainNet, "resnet34": ResNet}


def _steps(model, opt, steps):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([3, 7])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_sgd_and_gsgd_step_on_the_paper_models(arch, bn):
    torch.manual_seed(0)
    model = MODELS[arch](3, 10, bn=bn)
    sgd_losses = _steps(model, torch.optim.SGD(model.parameters(), lr=1e-3), 2)
    assert all(math.isfinite(v) for v in sgd_losses)
    model = MODELS[arch](3, 10, bn=bn)
    opt = GSGD(model, lr=1e-3)
    assert opt.blocks, "no chain block found"
    losses = _steps(model, opt, 2 if bn else 1)
    assert all(math.isfinite(v) for v in losses)
    if bn:   # with batch norm (the paper's setting) the loss starts where SGD's does
        assert losses[0] < 10


@pytest.mark.parametrize("arch", list(MODELS))
def test_path_sgd_steps_without_bn_and_refuses_bn(arch):
    torch.manual_seed(0)
    model = MODELS[arch](3, 10, bn=False)
    losses = _steps(model, PathSGD(model, lr=1e-3, input_shape=(3, 32, 32)), 2)
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        PathSGD(MODELS[arch](3, 10, bn=True), lr=1e-3, input_shape=(3, 32, 32))
