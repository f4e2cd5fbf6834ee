"""`model=torchvision model.arch=NAME`: any torchvision classification model in the runner and in
`gsgd inspect` (weights=None, the data's classes; small or 1-channel images adapted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from gsgd_cli.models import build_model
from gsgd_cli.models.torchvision_models import InputAdapter

pytest.importorskip("torchvision")


def _cfg(arch, **extra):
    return {"name": "torchvision", "arch": arch, **extra}


def test_cifar_shape_builds_the_plain_torchvision_model():
    from torchvision.models import ResNet

    model = build_model(_cfg("resnet18"), (3, 32, 32), 10)
    assert isinstance(model, ResNet) and model.fc.out_features == 10


@pytest.mark.parametrize("arch,shape,adapter", [
    ("vgg11", (1, 28, 28), (3, 32)),        # Fashion-MNIST: repeated and upsampled
    ("resnet18", (1, 7, 7), (3, None)),     # runs at 7x7: only repeated
    ("vgg11", (3, 16, 16), (1, 32)),        # too small for five poolings: upsampled
])
def test_small_or_grey_images_get_an_input_adapter(arch, shape, adapter):
    model = build_model(_cfg(arch), shape, 10)
    assert isinstance(model, nn.Sequential) and isinstance(model[0], InputAdapter)
    assert (model[0].channels, model[0].size) == adapter
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_image_size_can_be_set():
    model = build_model(_cfg("resnet18", image_size=40), (3, 32, 32), 10)
    assert model[0].size == 40


@pytest.mark.parametrize("cfg,message", [
    (_cfg("vgg12"), "Invalid model.arch='vgg12'. Must be a torchvision classification model, "
                    "e.g. vgg11"),
    (_cfg("resnet18", image_size=0), "Invalid model.image_size=0"),
])
def test_bad_values_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model(cfg, (3, 32, 32), 10)


SMOKE = ["data=synthetic", "data.shape=[3,32,32]", "data.num_classes=10", "data.train_size=32",
         "data.test_size=16", "train.iterations=2", "train.batch_size=8", "train.eval_every=2",
         "train.eval_batch_size=16", "optimizer.lr=0.001"]


def test_train_resnet18_with_gsgd(gsgd_train_inproc, tmp_path):
    code, out, err = gsgd_train_inproc("model=torchvision", "model.arch=resnet18", *SMOKE)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 2
    coverage = next(n for n in summary["optimizer_notes"] if "trainable parameters" in n)
    assert ("98.2% approximate (through batch norm: the paper's eq. 39) of the trainable "
            "parameters of ResNet") in coverage             # every block runs through BN


def test_train_vgg11_with_gsgd(gsgd_train_inproc, tmp_path):
    code, out, err = gsgd_train_inproc("model=torchvision", "model.arch=vgg11", *SMOKE)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] in ("completed", "diverged") and summary["num_parameters"] > 1e8


def test_path_sgd_on_a_torchvision_model_with_batch_norm_is_one_line(gsgd_train_inproc):
    code, out, err = gsgd_train_inproc("model=torchvision", "model.arch=resnet18",
                                       "optimizer=path_sgd", *SMOKE)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "PathSGD does not support normalisation: module 'bn1' (BatchNorm2d)" in lines[0]


def test_inspect_a_torchvision_model_from_the_config():
    result = subprocess.run([sys.executable, "-m", "gsgd_cli", "inspect", "model=torchvision",
                             "model.arch=resnet18", "data=cifar10"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("model: torchvision (resnet18) for data 'cifar10' (input (3, 32, 32)")
    assert out.count("chain block ") == 8 and "(98.2%)" in out
    assert "outside: fc.weight (10, 512): not joined to another Linear/Conv2d by ReLU" in out
