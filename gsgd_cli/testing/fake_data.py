"""Small files in the real on-disk formats, for tests and offline smoke runs.

* `write_fake_idx(folder, n_train, n_test, gz=False)` - the four (Fashion-)MNIST idx files;
* `write_fake_cifar(root, name, n_per_batch, n_test)` - CIFAR-10/100 python pickles.

Labels are random; images are random bytes. torchvision's loaders read them (CIFAR ones only
with the md5 check off, as for any user-supplied root).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from gsgd_cli.data.datasets import IDX_FILES
from gsgd_cli.data.idx import write_idx


def write_fake_idx(folder: str | Path, n_train: int = 128, n_test: int = 64, gz: bool = False,
                   seed: int = 0, size: int = 28) -> Path:
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[split]
        write_idx(folder / (images + suffix), rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(folder / (labels + suffix), rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def write_fake_cifar(root: str | Path, name: str = "cifar10", n_per_batch: int = 20,
                     n_test: int = 40, seed: int = 0) -> Path:
    """CIFAR-10: 5 training batches of `n_per_batch`; CIFAR-100: one train file of 5x that."""
    rng = np.random.default_rng(seed)

    def batch(n, classes, key):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                key: rng.integers(0, classes, n).tolist()}

    def dump(obj, path):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            dump(batch(n_per_batch, 10, "labels"), folder / f"data_batch_{i}")
        dump(batch(n_test, 10, "labels"), folder / "test_batch")
        dump({"label_names": [f"class{i}" for i in range(10)]}, folder / "batches.meta")
    elif name == "cifar100":
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        dump(batch(5 * n_per_batch, 100, "fine_labels"), folder / "train")
        dump(batch(n_test, 100, "fine_labels"), folder / "test")
        dump({"fine_label_names": [f"class{i}" for i in range(100)]}, folder / "meta")
    else:
        raise ValueError(f"Invalid name={name!r}. Must be cifar10 or cifar100.")
    return folder
