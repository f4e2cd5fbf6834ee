"""Device-resident data: whole splits as uint8 tensors, batches as index slices.

Batches are turned into network inputs on the device: scale to [0, 1], average-pool (MNIST
family at `data.size` < 28), for CIFAR random crop with 4-pixel zero padding and horizontal flip
on the whole batch at once (with `data.grayscale=true` colour images were made one grey
channel when loaded, `gsgd_cli.data.gray`), then per-channel normalisation (`data.normalize=standard`, the
default) or none (`unit`: pixels stay in [0, 1], the paper's section 5.3 setting). Random numbers for shuffling and
augmentation come from one CPU `torch.Generator` owned by the trainer, so runs are reproducible
and resumable on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gsgd_cli.errors import UserError

from .common import cfg_get, check_labels
from .datasets import SPECS, data_name, load_raw, pool_size
from .gray import grayscale, pixel_stats, to_gray
from .synthetic import synthetic_shape

CROP_PADDING = 4


NORMALIZE = ("standard", "unit")


def normalisation(data_cfg: Any) -> str:
    """`data.normalize`: `standard` subtracts the training split's per-channel mean and divides
    by its std; `unit` keeps the pixels on the [0, 1] scale (the paper's section 5.3 setting)."""
    value = cfg_get(data_cfg, "normalize", "standard")
    if value not in NORMALIZE:
        raise UserError(f"Invalid data.normalize={value!r}. Must be standard (per-channel mean "
                        "and std) or unit (pixels in [0, 1]).")
    return value


def describe(data_cfg: Any) -> tuple[tuple[int, int, int], int]:
    """`(in_shape, num_classes)` of the network inputs for a data config, without loading data.

    E.g. `fashion_mnist` with `size: 7` gives `((1, 7, 7), 10)`.
    """
    normalisation(data_cfg)
    name = data_name(data_cfg)
    if name == "synthetic":
        (channels, *hw), num_classes = synthetic_shape(data_cfg)
        return (1 if grayscale(data_cfg) and channels == 3 else channels, *hw), num_classes
    spec = SPECS[name]
    size = pool_size(data_cfg)
    return (1 if grayscale(data_cfg) else spec.in_shape[0], size, size), spec.num_classes


@dataclass
class DeviceData:
    """The splits on one device plus what it takes to turn uint8 batches into inputs.

    `val_x`/`val_y` are held out of the training split when `data.val_size > 0` (else empty)."""

    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: torch.Tensor  # [1, C, 1, 1] on the device
    std: torch.Tensor
    augment: bool
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def has_val(self) -> bool:
        return self.val_y is not None and len(self.val_y) > 0

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> "DeviceData":
        """The same splits on `device`."""
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = _to_device(value, torch.device(device))
        return DeviceData(**moved)

    def inputs(self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Network inputs for a uint8 batch; augmentation only when `train` and enabled.

        `share=(k, n)`: `x` is the k-th of n equal parts of a batch (a rank's share in
        data-parallel training); the augmentation draws the random numbers of the whole batch
        and uses the k-th part, so the n parts together get what one process would."""
        x = x.to(dtype) / 255.0
        size = self.in_shape[-1]
        if x.shape[-1] != size:
            x = F.avg_pool2d(x, kernel_size=x.shape[-1] // size)
        if train and self.augment:
            if generator is None:
                raise ValueError("augmentation needs a torch.Generator")
            x = random_crop_flip(x, generator, share=share)
        return (x - self.mean.to(dtype)) / self.std.to(dtype)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator,
                     padding: int = CROP_PADDING, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per sample, batched.

    Offsets and flips are drawn on the CPU from `generator` (a few bytes per sample) and then
    moved to the batch's device (on CUDA from pinned memory, asynchronously: no sync).
    `share=(k, parts)`: `x` is the k-th of `parts` equal parts of a batch: the draws are those
    of the whole batch, and the k-th part of them is used.
    """
    n, c, h, w = x.shape
    k, parts = share
    part = slice(k * n, (k + 1) * n)
    offsets = torch.randint(0, 2 * padding + 1, (2, n * parts), generator=generator)[:, part]
    flips = torch.rand(n * parts, generator=generator)[part] < 0.5
    offsets = offsets.contiguous()
    offsets, flips = _to_device(offsets, x.device), _to_device(flips, x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def hold_out(train_x: torch.Tensor, train_y: torch.Tensor, val_size: Any,
             split_seed: Any = 0) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, val_x, val_y): `val_size` training examples, drawn by a permutation
    seeded with `split_seed` (not the run's seed, so every run of a sweep holds out the same
    examples), become the validation split; the rest keep their original order."""
    n = len(train_y)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < n:
        raise UserError(f"Invalid data.val_size={val_size!r}. Must be an integer from 0 to "
                        f"{n - 1} (training examples held out for validation; 0 = none).")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise UserError(f"Invalid data.split_seed={split_seed!r}. Must be an integer.")
    if val_size == 0:
        return train_x, train_y, train_x[:0], train_y[:0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx]


def load_data(data_cfg: Any, device: torch.device | str = "cpu") -> DeviceData:
    """Load the splits of a data set onto `device` (uint8 images, int64 labels)."""
    name = data_name(data_cfg)
    in_shape, num_classes = describe(data_cfg)
    train_x, train_y, test_x, test_y = load_raw(data_cfg)
    for split, y in (("training", train_y), ("test", test_y)):
        if len(y) == 0:   # else: a ZeroDivisionError at the first evaluation, or odd messages
            raise UserError(f"the {split} split of data.name={name} holds no examples; check "
                            "the data files (for synthetic data: data.train_size, "
                            "data.test_size).")
    for split, y in (("training", train_y), ("test", test_y)):   # every reader checks its files
        check_labels(y, num_classes, f"the {split} split of data.name={name}",
                     "check the data files (labels must be 0..num_classes-1)")
    gray = grayscale(data_cfg) and train_x.shape[1] == 3
    if gray:   # colour -> one grey channel (paper, appendix 11.7: "input images of gray scale")
        train_x, test_x = to_gray(train_x), to_gray(test_x)
        gray_mean, gray_std = pixel_stats(train_x)   # the whole training split, as SPECS'
    train_x, train_y, val_x, val_y = hold_out(train_x, train_y,
                                              cfg_get(data_cfg, "val_size", 0),
                                              cfg_get(data_cfg, "split_seed", 0))
    if name == "synthetic":
        mean = (0.5,) * in_shape[0]
        std = (0.25,) * in_shape[0]
        augment = bool(cfg_get(data_cfg, "augment", False))
    else:
        spec = SPECS[name]
        mean, std = spec.mean, spec.std
        augment = bool(cfg_get(data_cfg, "augment", spec.augment))
    if gray:
        mean, std = gray_mean, gray_std
    if normalisation(data_cfg) == "unit":
        mean, std = (0.0,) * in_shape[0], (1.0,) * in_shape[0]
    device = torch.device(device)
    shape = (1, len(mean), 1, 1)
    return DeviceData(
        name=name,
        train_x=train_x.to(device), train_y=train_y.to(device),
        test_x=test_x.to(device), test_y=test_y.to(device),
        in_shape=in_shape, num_classes=num_classes,
        mean=torch.tensor(mean, device=device).view(shape),
        std=torch.tensor(std, device=device).view(shape),
        augment=augment,
        val_x=val_x.to(device), val_y=val_y.to(device),
    )
