"""Data sets: descriptions, real file formats through the real loaders, pipeline, messages."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsgd_cli.data import describe, load_data, random_crop_flip
from gsgd_cli.testing.fake_data import write_fake_cifar, write_fake_idx
from gsgd_cli.data.fetch import fetch
from gsgd_cli.data.idx import read_idx, write_idx
from gsgd_cli.errors import DataNotFoundError, UserError


@pytest.mark.parametrize("name, overrides, expected", [
    ("fashion_mnist", [], ((1, 7, 7), 10)),
    ("fashion_mnist", ["data.size=28"], ((1, 28, 28), 10)),
    ("mnist", [], ((1, 28, 28), 10)),
    ("mnist", ["data.size=14"], ((1, 14, 14), 10)),
    ("cifar10", [], ((3, 32, 32), 10)),
    ("cifar100", [], ((3, 32, 32), 100)),
    ("synthetic", ["data.shape=[2,5,3]", "data.num_classes=3"], ((2, 5, 3), 3)),
])
def test_describe_real_configs(compose_train, name, overrides, expected):
    cfg = compose_train(f"data={name}", *overrides)
    assert describe(cfg.data) == expected


def test_describe_rejects_bad_values(compose_train):
    with pytest.raises(UserError, match=r"Invalid data.size=10 for fashion_mnist. Must divide 28"):
        describe(compose_train("data.size=10").data)
    with pytest.raises(UserError, match=r"Invalid data.shape=\[3, 0, 4\]"):
        describe({"name": "synthetic", "shape": [3, 0, 4]})
    with pytest.raises(UserError, match="Unknown data.name='svhn'"):
        describe({"name": "svhn"})


def test_normalize_unit_keeps_pixels_in_0_1_and_standard_uses_the_data_set_statistics(tmp_path):
    write_fake_idx(tmp_path / "MNIST" / "raw", n_train=32, n_test=16)
    cfg = {"name": "mnist", "root": str(tmp_path)}
    raw = load_data(cfg).train_x[:4]
    unit = load_data({**cfg, "normalize": "unit"})
    standard = load_data({**cfg, "normalize": "standard"})
    scaled = raw.double() / 255.0
    assert torch.equal(unit.inputs(raw, train=False, dtype=torch.float64), scaled)
    assert torch.allclose(standard.inputs(raw, train=False, dtype=torch.float64),
                          (scaled - 0.1307) / 0.3081)
    with pytest.raises(UserError, match=r"Invalid data.normalize='none'. Must be standard"):
        describe({**cfg, "normalize": "none"})


def test_idx_roundtrip_plain_and_gz(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(array))
    raw = gzip.open(tmp_path / "a-idx3-ubyte.gz").read()
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")


def test_mnist_through_torchvision_layout(tmp_path):
    write_fake_idx(tmp_path / "MNIST" / "raw", n_train=32, n_test=16)
    data = load_data({"name": "mnist", "root": str(tmp_path)})
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (32, 1, 28, 28)
    assert data.test_y.dtype == torch.int64 and data.test_y.shape == (16,)
    expected = read_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte")
    assert torch.equal(data.train_x[:, 0], expected)


def test_fashion_mnist_from_system_gz_dir_pools_to_7x7(tmp_path):
    system = write_fake_idx(tmp_path / "debian", n_train=32, n_test=16, gz=True)
    data = load_data({"name": "fashion_mnist", "root": str(tmp_path / "none"),
                      "system_dir": str(system), "size": 7})
    assert data.in_shape == (1, 7, 7) and data.train_x.shape == (32, 1, 28, 28)
    x = data.inputs(data.train_x[:4], train=False)
    raw = data.train_x[:4].float() / 255
    pooled = raw.reshape(4, 1, 7, 4, 7, 4).mean((3, 5))
    torch.testing.assert_close(x, (pooled - 0.2860) / 0.3530)


def test_fashion_mnist_prefers_root(tmp_path):
    write_fake_idx(tmp_path / "FashionMNIST" / "raw", n_train=8, n_test=8, seed=1)
    system = write_fake_idx(tmp_path / "debian", n_train=32, n_test=16, gz=True)
    data = load_data({"name": "fashion_mnist", "root": str(tmp_path), "system_dir": str(system)})
    assert len(data.train_y) == 8


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_generated_cifar_roots_load_without_md5(tmp_path, name, classes):
    import torchvision

    write_fake_cifar(tmp_path, name, n_per_batch=6, n_test=10)
    data = load_data({"name": name, "root": str(tmp_path)})
    assert data.train_x.shape == (30, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    assert data.augment and data.num_classes == classes
    # torchvision's own class checks md5 and rejects the same files: that is why we subclass.
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    with pytest.raises(RuntimeError):
        cls(str(tmp_path), train=True, download=False)


def test_cifar_channel_order(tmp_path):
    import pickle

    folder = write_fake_cifar(tmp_path, "cifar10", n_per_batch=2, n_test=2)
    batch = pickle.load(open(folder / "test_batch", "rb"))
    data = load_data({"name": "cifar10", "root": str(tmp_path)})
    red = torch.from_numpy(batch["data"][0, :1024].reshape(32, 32))
    assert torch.equal(data.test_x[0, 0], red)


@pytest.mark.parametrize("cfg, needles", [
    ({"name": "mnist"}, ["MNIST/raw", "data.download=true", "gsgd train data=mnist"]),
    ({"name": "fashion_mnist"}, ["FashionMNIST/raw", "apt-get install -y dataset-fashion-mnist"]),
    ({"name": "cifar10"}, ["cifar-10-batches-py", "data=cifar10", "data.download=true"]),
    ({"name": "cifar100"}, ["cifar-100-python", "data=cifar100", "data.download=true"]),
])
def test_missing_data_is_one_line_with_path_and_fix(tmp_path, cfg, needles):
    cfg = {**cfg, "root": str(tmp_path / "empty"), "system_dir": str(tmp_path / "nodebian")}
    with pytest.raises(DataNotFoundError) as info:
        load_data(cfg)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "empty") in message
    for needle in needles:
        assert needle in message


def test_random_crop_flip_is_a_shifted_window(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 6, 5)
    out = random_crop_flip(x, gen, padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, r:r + 6, c:c + 5] for r in range(5) for c in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # something moved
    again = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again)


def test_augmentation_only_in_training(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_per_batch=4, n_test=4)
    data = load_data({"name": "cifar10", "root": str(tmp_path)})
    batch = data.train_x[:8]
    plain = data.inputs(batch, train=False)
    assert torch.equal(plain, data.inputs(batch, train=False))
    augmented = data.inputs(batch, train=True, generator=torch.Generator().manual_seed(1))
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    torch.testing.assert_close(plain.mean((0, 2, 3)), ((batch.float() / 255).mean((0, 2, 3))
                               - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616]))


def test_synthetic_is_seeded_and_learnable_shape():
    cfg = {"name": "synthetic", "shape": [3, 4, 4], "num_classes": 5, "train_size": 50,
           "test_size": 20, "seed": 3}
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = load_data({**cfg, "seed": 4})
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (50, 3, 4, 4) and int(a.train_y.max()) < 5


def test_fetch_reports_existing_data(tmp_path):
    system = write_fake_idx(tmp_path / "debian", n_train=4, n_test=4, gz=True)
    line = fetch("fashion_mnist", root=tmp_path / "root", system_dir=system, use_apt=False)
    assert line == f"fashion_mnist: data already there ({system})"
    write_fake_idx(tmp_path / "root" / "MNIST" / "raw", n_train=4, n_test=4)
    assert "already there" in fetch("mnist", root=tmp_path / "root", use_apt=False)


def test_fetch_uses_apt_then_torchvision(tmp_path, monkeypatch):
    import gsgd_cli.data.fetch as fetch_mod

    system = tmp_path / "debian"
    calls = []

    def fake_apt():
        calls.append("apt")
        write_fake_idx(system, n_train=4, n_test=4, gz=True)
        return True

    monkeypatch.setattr(fetch_mod, "_apt_install", fake_apt)
    line = fetch("fashion_mnist", root=tmp_path / "root", system_dir=system, use_apt=True)
    assert calls == ["apt"] and "installed the Debian package dataset-fashion-mnist" in line

    def fake_download(cfg):
        assert cfg["download"] is True
        write_fake_idx(tmp_path / "root2" / "FashionMNIST" / "raw", n_train=4, n_test=4)

    monkeypatch.setattr(fetch_mod, "load_raw", fake_download)
    line = fetch("fashion_mnist", root=tmp_path / "root2", system_dir=tmp_path / "no", use_apt=False)
    assert line.startswith("fashion_mnist: downloaded with torchvision into")
