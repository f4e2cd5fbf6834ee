"""Models: shapes, parameter counts, BN switch, fx-traceability, and every model config trains."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from gsgd_cli.models import MLP, PlainNet, ResNet, build_model

MODEL_CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_model_configs_present():
    assert {"mlp", "plain34", "resnet34", "plain_tiny", "resnet_tiny"} <= set(MODEL_CONFIGS)


def test_resnet34_cifar10_parameter_count():
    # Standard CIFAR ResNet-34 (3x3 stem, projection shortcuts, no max pool): 21,282,122.
    assert n_params(ResNet(3, 10)) == 21_282_122
    assert n_params(ResNet(3, 100)) == 21_282_122 + 90 * 513


def test_plain34_structure():
    model = PlainNet(3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 34  # stem + 32 blocks + classifier
    assert [c.stride[0] for c in convs].count(2) == 3
    assert [c.out_channels for c in convs[1:]] == [64] * 6 + [128] * 8 + [256] * 12 + [512] * 6
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert n_params(model) == 21_108_298


def test_resnet34_blocks_and_shortcuts():
    model = ResNet(3, 10)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 16
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 3  # at the starts of stages 2, 3, 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("cls", [PlainNet, ResNet])
def test_bn_switch(cls):
    with_bn = cls(3, 10, blocks=[1, 1], widths=[8, 16])
    without = cls(3, 10, blocks=[1, 1], widths=[8, 16], bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())


@pytest.mark.parametrize("model", [MLP(49, 10), PlainNet(3, 10, blocks=[1, 2], widths=[8, 16]),
                                   ResNet(3, 10, blocks=[2, 1], widths=[8, 16])],
                         ids=["mlp", "plain", "resnet"])
def test_fx_traceable_and_plain_modules(model):
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 7, 7) if isinstance(model, MLP) else torch.randn(2, 3, 16, 16)
    model.eval()
    traced.eval()
    torch.testing.assert_close(traced(x), model(x))
    functional_relu = [n for n in traced.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    assert not functional_relu  # ReLUs are modules, so structure-aware optimizers see them


def test_mlp_from_config_matches_paper_shape(compose_train):
    cfg = compose_train()
    model = build_model(cfg.model, (1, 7, 7), 10)
    assert model.widths == [49, 64, 64, 10]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_trains_one_step(compose_train, name):
    # model=custom names the user's class; here PlainNet, which takes in_channels, num_classes
    extra = ["model._target_=gsgd_cli.models.convnets.PlainNet", "+model.blocks=[1,1]",
             "+model.widths=[4,8]"] if name == "custom" else []
    cfg = compose_train(f"model={name}", "data=synthetic", "data.shape=[3,8,8]", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, (3, 8, 8), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert model(x).shape == (4, 4)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.grad is not None)


def test_bad_model_values_raise_clear_errors():
    with pytest.raises(ValueError, match="Invalid model.name='vgg'"):
        build_model({"name": "vgg"}, (3, 32, 32), 10)
    with pytest.raises(ValueError, match="Invalid MLP width=0"):
        build_model({"name": "mlp", "width": 0}, (1, 7, 7), 10)
    with pytest.raises(ValueError, match="same length"):
        build_model({"name": "resnet", "blocks": [1, 1], "widths": [8]}, (3, 32, 32), 10)
