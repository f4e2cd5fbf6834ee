"""Issue 9, section 5: damaged data files and labels out of range are one line naming the file
and the fix (exit code 2 from `gsgd train`), never a traceback or a crash mid-training."""
from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from gsgd_cli.data import load_data
from gsgd_cli.testing.fake_data import write_fake_cifar, write_fake_idx
from gsgd_cli.data.idx import write_idx
from gsgd_cli.train import UserError

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def damage_idx(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bad magic":
        path.write_bytes(b"\x01\x02" + data[2:])
    elif how == "header only":
        path.write_bytes(data[:6])
    elif how == "label 12":
        labels = np.zeros(64, np.uint8)
        labels[5] = 12
        write_idx(path, labels)


def damage_gz(path, how):
    if how in ("truncated", "bad magic", "header only", "label 12"):
        raw = gzip.decompress(path.read_bytes())
        plain = path.with_suffix("")
        plain.write_bytes(raw)
        damage_idx(plain, how)
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    elif how == "truncated gz":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "not gzip":
        path.write_bytes(b"this is not a gzip file at all" * 10)


RAW_CASES = [("truncated", IMAGES, "header says shape"), ("bad magic", IMAGES, "bad magic number"),
             ("header only", IMAGES, "truncated"), ("truncated", LABELS, "header says shape"),
             ("label 12", LABELS, "holds label 12, outside 0..9")]


@pytest.mark.parametrize("how, name, needle", RAW_CASES)
def test_damaged_idx_in_the_root_is_one_line(tmp_path, how, name, needle):
    raw = write_fake_idx(tmp_path / "MNIST" / "raw", n_train=64, n_test=32)
    damage_idx(raw / name, how)
    with pytest.raises(UserError) as info:
        load_data({"name": "mnist", "root": str(tmp_path)})
    message = str(info.value)
    assert "\n" not in message and str(raw / name) in message and needle in message, message
    assert f"python -m gsgd_cli.data.fetch mnist --root {tmp_path}" in message


@pytest.mark.parametrize("how, name, needle", RAW_CASES + [
    ("truncated gz", IMAGES, "is not a complete gzip file"),
    ("not gzip", LABELS, "is not a complete gzip file")])
def test_damaged_gz_in_the_debian_folder_is_one_line(tmp_path, how, name, needle):
    system = write_fake_idx(tmp_path / "debian", n_train=64, n_test=32, gz=True)
    damage_gz(system / (name + ".gz"), how)
    with pytest.raises(UserError) as info:
        load_data({"name": "fashion_mnist", "root": str(tmp_path / "none"),
                   "system_dir": str(system)})
    message = str(info.value)
    assert "\n" not in message and str(system / (name + ".gz")) in message, message
    assert needle in message and "apt-get install --reinstall dataset-fashion-mnist" in message


def rewrite_batch(path, change):
    with open(path, "rb") as f:
        entry = pickle.load(f)
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


CIFAR_CASES = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:500]), "corrupt or truncated"),
    ("garbage", lambda p: p.write_bytes(b"\x80\x04garbage" * 50), "corrupt or truncated"),
    ("empty", lambda p: p.write_bytes(b""), "corrupt or truncated"),
    ("wrong shape", lambda p: rewrite_batch(p, lambda e: e.update(data=e["data"][:, :1024])),
     "holds 'data' of shape [4, 1024]"),
    ("float data", lambda p: rewrite_batch(p, lambda e: e.update(data=e["data"] / 255.0)),
     "type float64, not uint8"),
    ("label 10", lambda p: rewrite_batch(p, lambda e: e["labels"].__setitem__(2, 10)),
     "holds label 10, outside 0..9"),
    ("labels missing", lambda p: rewrite_batch(p, lambda e: e.pop("labels")),
     "is not a CIFAR batch"),
    ("one label short", lambda p: rewrite_batch(p, lambda e: e["labels"].pop()),
     "holds 4 images but 3 labels"),
]


@pytest.mark.parametrize("how, damage, needle", CIFAR_CASES, ids=[c[0] for c in CIFAR_CASES])
def test_damaged_cifar_batch_is_one_line(tmp_path, how, damage, needle):
    folder = write_fake_cifar(tmp_path, "cifar10", n_per_batch=4, n_test=4)
    damage(folder / "data_batch_2")
    with pytest.raises(UserError) as info:
        load_data({"name": "cifar10", "root": str(tmp_path)})
    message = str(info.value)
    assert "\n" not in message and str(folder / "data_batch_2") in message, message
    assert needle in message and "data.download=true" in message, message


def test_cifar100_label_out_of_range(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar100", n_per_batch=4, n_test=4)
    rewrite_batch(folder / "test", lambda e: e["fine_labels"].__setitem__(0, 100))
    with pytest.raises(UserError, match=r"test holds label 100, outside 0\.\.99 \(100 classes\)"):
        load_data({"name": "cifar100", "root": str(tmp_path)})


def test_damaged_data_through_the_cli_is_one_line_exit_2(gsgd_train_inproc, tmp_path):
    raw = write_fake_idx(tmp_path / "data" / "MNIST" / "raw", n_train=64, n_test=32)
    damage_idx(raw / "t10k-labels-idx1-ubyte", "truncated")
    code, out, err = gsgd_train_inproc("data=mnist", f"data.root={tmp_path / 'data'}",
                                       "optimizer=sgd", "train.iterations=2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"gsgd train: error: {raw / 't10k-labels-idx1-ubyte'}: header says")


@pytest.mark.parametrize("overrides, value", [
    (["optimizer=sgd", "optimizer.lr=abc"], "'abc'"),
    (["optimizer=sgd", "optimizer.lr=nan"], "nan"),
    (["optimizer=sgd", "optimizer.lr=inf"], "inf"),
    (["optimizer=sgd", "optimizer.lr=0"], "0"),
    (["optimizer=gsgd", "optimizer.lr=inf"], "inf"),
    (["optimizer=gsgd", "optimizer.lr=abc"], "'abc'"),
    (["optimizer=path_sgd", "optimizer.lr=0"], "0"),
    (["optimizer=path_sgd", "optimizer.lr=inf"], "inf"),
])
def test_learning_rates_are_checked_alike_for_every_optimizer(gsgd_train_inproc, overrides, value):
    code, out, err = gsgd_train_inproc("data=synthetic", "train.iterations=2",
                                       "train.batch_size=16", *overrides)
    assert code == 2 and err.strip().splitlines() == [
        f"gsgd train: error: optimizer: Invalid lr={value}. Must be a finite number > 0."], err


@pytest.mark.parametrize("key, value, bound", [("momentum", "abc", "in [0, 1)"),
                                               ("momentum", "1.0", "in [0, 1)"),
                                               ("weight_decay", "-1", ">= 0"),
                                               ("weight_decay", "inf", ">= 0")])
def test_sgd_momentum_and_weight_decay_are_checked(gsgd_train_inproc, key, value, bound):
    code, out, err = gsgd_train_inproc("data=synthetic", "train.iterations=2",
                                       "train.batch_size=16", "optimizer=sgd",
                                       f"optimizer.{key}={value}")
    shown = repr(value) if value == "abc" else value
    assert code == 2 and err.strip().splitlines() == [
        f"gsgd train: error: optimizer: Invalid {key}={shown}. Must be a finite number {bound}."]
