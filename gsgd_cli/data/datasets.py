"""Loading each data set into uint8 tensors `[N, C, H, W]` plus int64 labels.

Real data sets go through torchvision's data set classes and file layouts under `data.root`:

* `mnist`          `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`
* `fashion_mnist`  `<root>/FashionMNIST/raw/...` (same names), or else the gzip idx files of the
                   Debian package `dataset-fashion-mnist` in `data.system_dir`
                   (`/usr/share/datasets/fashion-mnist`), read directly.
* `cifar10`        `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`
* `cifar100`       `<root>/cifar-100-python/{train,test,meta}`

CIFAR batches are pickles by format; `gsgd_cli.data.cifar` reads them with a restricted
unpickler (numpy arrays and plain values only). With `data.download=true` torchvision downloads
the archive and every batch must match torchvision's md5 list; roots that the user generated or
copied are read without the md5 check.
"""
from __future__ import annotations

import contextlib
import io
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gsgd_cli.errors import DataNotFoundError, UserError

from .common import cfg_get, check_labels
from .idx import read_idx

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DataSpec:
    """Static facts about a data set: native shape, classes and normalisation constants."""

    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip during training


# Per-channel mean/std of the training split on the [0, 1] scale.
SPECS = {
    "mnist": DataSpec((1, 28, 28), 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": DataSpec((1, 28, 28), 10, (0.2860,), (0.3530,), False),
    "cifar10": DataSpec((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DataSpec((3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}
NAMES = (*SPECS, "synthetic")


def data_name(cfg: Any) -> str:
    name = cfg_get(cfg, "name")
    if name not in NAMES:
        raise UserError(f"Unknown data.name={name!r}. Choose one of: {', '.join(NAMES)} "
                        "(e.g. data=cifar10).")
    return name


def pool_size(cfg: Any) -> int:
    """Side length after average pooling for the MNIST family (`data.size`), else native."""
    name = data_name(cfg)
    native = SPECS[name].in_shape[-1] if name in SPECS else None
    size = cfg_get(cfg, "size", native)
    if name not in ("mnist", "fashion_mnist"):
        return native
    if not isinstance(size, int) or size < 1 or native % size:
        raise UserError(f"Invalid data.size={size!r} for {name}. Must divide 28 "
                        "(28 = full resolution, 14, or 7 as in the paper's section 5.2).")
    return size


def _shell_path(path: Path | str) -> str:
    return shlex.quote(str(path))


def _idx_split(folder: Path, split: str, suffix: str = "", *, fix: str,
               num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[N, 1, 28, 28]` and labels of one split; a damaged file is one `UserError`
    naming it and `fix` (how to get the original files back)."""
    images, labels = (folder / (name + suffix) for name in IDX_FILES[split])
    try:
        x = read_idx(images)
        y = read_idx(labels).long()
    except (ValueError, OSError) as exc:
        raise UserError(f"{str(exc).splitlines()[0]}; {fix}.") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{images} and {labels} do not hold matching 28x28 images [N,28,28] "
                        f"and labels [N] (shapes {list(x.shape)} and {list(y.shape)}); {fix}.")
    check_labels(y, num_classes, labels, fix)
    return x.unsqueeze(1), y


def _has_idx(folder: Path, suffix: str = "") -> bool:
    return all((folder / (n + suffix)).is_file() for pair in IDX_FILES.values() for n in pair)


def _torchvision_download(class_name: str, root: Path) -> None:
    """torchvision's MNIST/FashionMNIST download (md5-checked) into `<root>/<Class>/raw`."""
    import torchvision  # only here: importing it costs about a second

    cls = getattr(torchvision.datasets, class_name)
    for train in (True, False):
        # torchvision prints download progress to stdout; keep our output to one line per event.
        with contextlib.redirect_stdout(io.StringIO()):
            cls(str(root), train=train, download=True)


def _read_idx_folder(folder: Path, suffix: str, fix: str):
    return (*_idx_split(folder, "train", suffix, fix=fix), *_idx_split(folder, "test", suffix, fix=fix))


def _load_mnist_family(name: str, cfg: Any):
    root = Path(cfg_get(cfg, "root", "data")).expanduser()
    download = bool(cfg_get(cfg, "download", False))
    class_name = "MNIST" if name == "mnist" else "FashionMNIST"  # torchvision's folder names
    raw = root / class_name / "raw"
    refetch = (f"delete the damaged files in {raw} and run `python -m gsgd_cli.data.fetch {name} "
               f"--root {_shell_path(root)}` (or add data.download=true)")
    if _has_idx(raw):
        return _read_idx_folder(raw, "", refetch)
    if name == "fashion_mnist":
        system_dir = cfg_get(cfg, "system_dir", None)
        if system_dir and _has_idx(Path(system_dir), ".gz"):
            return _read_idx_folder(Path(system_dir), ".gz", (
                f"reinstall them with `sudo apt-get install --reinstall {APT_PACKAGE}` "
                f"(or use data.system_dir=null and data.root with torchvision's files)"))
    if download:
        try:
            _torchvision_download(class_name, root)
            return _read_idx_folder(raw, "", refetch)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise DataNotFoundError(
                f"Downloading {class_name} into {raw} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network, or copy the "
                f"four idx files there by hand.") from None
    if name == "fashion_mnist":
        where = f"{raw}" + (f" or {system_dir}" if system_dir else "")
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {where}. Fix: `sudo apt-get install -y "
            f"dataset-fashion-mnist` (or `python -m gsgd_cli.data.fetch fashion_mnist "
            f"--root {_shell_path(root)}`, or add data.download=true).")
    raise DataNotFoundError(
        f"MNIST not found in {raw} (needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte). Fix: `gsgd train data=mnist "
        f"data.root={_shell_path(root)} data.download=true` (or `python -m gsgd_cli.data.fetch "
        f"mnist --root {_shell_path(root)}`).")


def _load_cifar(name: str, cfg: Any):
    from .cifar import load_cifar

    root = Path(cfg_get(cfg, "root", "data")).expanduser()
    return load_cifar(name, root, download=bool(cfg_get(cfg, "download", False)))


def load_raw(cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(train_x, train_y, test_x, test_y)` at native resolution, images as uint8 `[N,C,H,W]`."""
    name = data_name(cfg)
    if name == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(cfg)
    if name in ("mnist", "fashion_mnist"):
        return _load_mnist_family(name, cfg)
    return _load_cifar(name, cfg)
