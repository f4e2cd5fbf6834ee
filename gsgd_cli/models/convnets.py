"""Plain-34 and ResNet-34 in their CIFAR form (He et al. 2016, as used in the paper's 5.1).

Both start with a 3x3 convolution to 64 channels (no max pool), run four stages at 64, 128,
256 and 512 channels with stride 2 at the start of stages 2-4, then global average pooling and
a linear classifier:

* Plain-34: 32 single 3x3 conv blocks (conv [-> BN] -> ReLU) in stages of 6, 8, 12, 6;
* ResNet-34: basic blocks (two 3x3 convs) in stages of 3, 4, 6, 3, with a projection shortcut
  (1x1 conv [+ BN]) wherever the shape changes, identity otherwise.

Batch norm is on by default and can be switched off (`bn=False`). Convolutions have no bias.
Everything is built from plain modules (`nn.Conv2d`, `nn.BatchNorm2d`, `nn.ReLU`,
`nn.AdaptiveAvgPool2d`, `nn.Flatten`, `nn.Linear`) and the residual sum is a plain `+`, so
`torch.fx` can trace the models.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

PLAIN34_BLOCKS = (6, 8, 12, 6)
RESNET34_BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)


def _conv_unit(c_in: int, c_out: int, stride: int, bn: bool, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    if relu:
        layers.append(nn.ReLU())
    return layers


def _check(blocks: Sequence[int], widths: Sequence[int], in_channels: int, num_classes: int) -> None:
    if len(blocks) != len(widths) or not blocks:
        raise ValueError(f"Invalid blocks={list(blocks)} / widths={list(widths)}. Must be non-empty "
                         "lists of the same length (one entry per stage).")
    for name, values in (("blocks", blocks), ("widths", widths)):
        if not all(isinstance(v, int) and v > 0 for v in values):
            raise ValueError(f"Invalid {name}={list(values)}. Must be positive integers.")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}. Must be a positive integer.")


def _head(width: int, num_classes: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PlainNet(nn.Sequential):
    """Stem conv, then single 3x3 conv blocks per stage, pool, linear. Defaults give Plain-34."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 blocks: Sequence[int] = PLAIN34_BLOCKS, widths: Sequence[int] = WIDTHS,
                 bn: bool = True):
        _check(blocks, widths, in_channels, num_classes)
        layers = _conv_unit(in_channels, widths[0], 1, bn)
        c_in = widths[0]
        for stage, (n, width) in enumerate(zip(blocks, widths)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers += _conv_unit(c_in, width, stride, bn)
                c_in = width
        super().__init__(*layers, *_head(c_in, num_classes))
        _init(self)


class BasicBlock(nn.Module):
    """`relu(body(x) + shortcut(x))` with body = conv-BN-ReLU-conv-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool):
        super().__init__()
        self.body = nn.Sequential(*_conv_unit(c_in, c_out, stride, bn),
                                  *_conv_unit(c_out, c_out, 1, bn, relu=False))
        if stride != 1 or c_in != c_out:
            projection: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)]
            if bn:
                projection.append(nn.BatchNorm2d(c_out))
            self.shortcut: nn.Module = nn.Sequential(*projection)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Sequential):
    """Stem conv, basic-block stages, pool, linear. Defaults give ResNet-34 (CIFAR form)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 blocks: Sequence[int] = RESNET34_BLOCKS, widths: Sequence[int] = WIDTHS,
                 bn: bool = True):
        _check(blocks, widths, in_channels, num_classes)
        layers: list[nn.Module] = _conv_unit(in_channels, widths[0], 1, bn)
        c_in = widths[0]
        for stage, (n, width) in enumerate(zip(blocks, widths)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, width, stride, bn))
                c_in = width
        super().__init__(*layers, *_head(c_in, num_classes))
        _init(self)
