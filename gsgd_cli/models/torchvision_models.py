"""Any torchvision classification model for the runner: `model=torchvision model.arch=NAME`.

The network is built with `weights=None` (random initialisation, nothing is downloaded) and
the data set's number of classes. Inputs it cannot take as they are get an `InputAdapter` in
front: a 1-channel image (Fashion-MNIST, MNIST) is repeated to the 3 channels torchvision models
expect, and an image smaller than the architecture needs is upsampled (bilinear) to the
smallest of `SIZES` that it runs on (probed once, in eval mode, on one zero image), or to
`model.image_size` when set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZES = (32, 64, 96, 128, 160, 224, 299)


class InputAdapter(nn.Module):
    """Repeat a 1-channel image to `channels` and/or resize it to `size` x `size`."""

    def __init__(self, channels: int, size: int | None):
        super().__init__()
        self.channels = channels
        self.size = size

    def forward(self, x):
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


def torchvision_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def _runs(net: nn.Module, channels: int, size: int) -> bool:
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, channels, size, size))
        return True
    except RuntimeError:
        return False
    finally:
        net.train(training)


def build_torchvision(arch: str, in_shape: tuple[int, ...], num_classes: int,
                      image_size: int | None = None) -> nn.Module:
    from torchvision import models

    names = torchvision_names()
    if arch not in names:
        close = [n for n in names if n.startswith(str(arch)[:3])][:6] or names[:6]
        raise ValueError(f"Invalid model.arch={arch!r}. Must be a torchvision classification "
                         f"model, e.g. {', '.join(close)} (torchvision.models.list_models() "
                         f"lists all {len(names)}).")
    if len(in_shape) != 3:
        raise ValueError(f"Invalid input shape {tuple(in_shape)} for model 'torchvision'. "
                         "Must be (channels, height, width).")
    net = models.get_model(arch, weights=None, num_classes=num_classes)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    channels, height, width = in_shape
    if channels not in (1, first.in_channels):
        raise ValueError(f"model.arch={arch} reads {first.in_channels} channels and the data "
                         f"has {channels}; only 1-channel data is repeated to fit")
    repeat = first.in_channels if channels == 1 and first.in_channels != 1 else 1
    size = image_size
    if size is None and (height != width or not _runs(net, first.in_channels, height)):
        size = next((s for s in SIZES if s >= max(height, width)
                     and _runs(net, first.in_channels, s)), None)
        if size is None:
            raise ValueError(f"model.arch={arch} does not run on {height}x{width} images nor "
                             f"on any of the sizes {SIZES}; set model.image_size")
    if repeat == 1 and size is None:
        return net
    return nn.Sequential(InputAdapter(repeat, size), net)
