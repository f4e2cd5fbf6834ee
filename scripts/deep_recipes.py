#!/usr/bin/env python
"""Which G-SGD settings train standard deep networks? SGD beside G-SGD on torchvision models.

    python scripts/deep_recipes.py                       # the README's table (CPU, ~25 min)
    python scripts/deep_recipes.py --models resnet18 --settings sgd,gsgd --steps 20

Models (torchvision, weights=None, 10 classes): vgg11, vgg11_bn, resnet18 and resnet18_nobn
(ResNet-18 with every batch norm replaced by nn.Identity). Data: the runner's synthetic task at
CIFAR shape (`data=synthetic`: a random prototype image per class plus Gaussian noise 1.0,
3x32x32, 10 classes; 2048 training and 512 test images, normalised as the runner does). One
"epoch" here is one pass over those 2048 images at batch 32: 64 steps, the same batches in
the same order for every setting. Reported per run: the G-space share and whether the
construction warned that a step cannot be represented in float32; the loss of the first batch
(before any step, i.e. the function the optimizer starts from); the mean training loss of steps
11-20 and of the last 10 steps of the epoch; test accuracy after 20 steps and after the epoch;
and the step at which it stopped if it diverged (non-finite loss or `GSGDStepError`).

Settings (`name:lr`, several per `--settings` entry separated by commas):
  sgd          torch.optim.SGD
  gsgd         GSGD defaults (skeleton_init="one", the paper's)
  stage        GSGD(block_split="stage"): one block per run of equal-width layers
  keep         GSGD(skeleton_init="keep"): the model's own initialisation
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.data.synthetic import make_synthetic
from gsgd_cli.optim import GSGD, GSGDStepError

MODELS = ("vgg11", "vgg11_bn", "resnet18", "resnet18_nobn")
SETTINGS = ("sgd:0.01,sgd:0.001,gsgd:0.01,gsgd:0.001,stage:0.01,stage:0.001,keep:0.001")
OPTIONS = {"gsgd": {}, "stage": {"block_split": "stage"}, "keep": {"skeleton_init": "keep"}}
BATCH, TRAIN, TEST, NOISE = 32, 2048, 512, 1.0


def build(name: str) -> nn.Module:
    from torchvision import models

    if name == "resnet18_nobn":
        return models.resnet18(weights=None, num_classes=10, norm_layer=lambda c: nn.Identity())
    return models.get_model(name, weights=None, num_classes=10)


def data():
    cfg = dict(shape=[3, 32, 32], num_classes=10, train_size=TRAIN, test_size=TEST, noise=NOISE,
               seed=0)
    train_x, train_y, test_x, test_y = make_synthetic(cfg)
    norm = lambda u: (u.float() / 255 - 0.5) / 0.25        # noqa: E731  (the runner's)
    return norm(train_x), train_y, norm(test_x), test_y


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[k:k + 128]).argmax(1) == y[k:k + 128]).sum())
                      for k in range(0, len(x), 128))
    model.train()
    return correct / len(x)


def run(model_name: str, setting: str, lr: float, steps: int, tensors) -> dict:
    train_x, train_y, test_x, test_y = tensors
    torch.manual_seed(0)
    model = build(model_name)
    row = dict(model=model_name, setting=setting, lr=lr, share="-", range_warning="-")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if setting == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr)
        else:
            opt = GSGD(model, lr=lr, input_shape=(3, 32, 32), **OPTIONS[setting])
    if setting != "sgd":
        cov = opt._coverage
        row["share"] = f"{100 * cov.in_blocks / cov.total:.0f}%"
        row["range_warning"] = "yes" if any("make a step impossible" in str(w.message)
                                            for w in caught) else "no"
    order = torch.randperm(TRAIN, generator=torch.Generator().manual_seed(1))
    losses, stopped, start = [], None, time.time()
    for k in range(steps):
        index = order[(k * BATCH) % TRAIN:(k * BATCH) % TRAIN + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        if not math.isfinite(loss.item()):
            stopped = f"non-finite loss at step {k}"
            break
        losses.append(loss.item())
        loss.backward()
        try:
            opt.step()
        except GSGDStepError:
            stopped = f"GSGDStepError at step {k}"
            break
        if k + 1 == 20:
            row["acc20"] = accuracy(model, test_x, test_y)
    row["loss0"] = losses[0] if losses else float("nan")
    row["loss11_20"] = (sum(losses[10:20]) / len(losses[10:20])) if len(losses) >= 20 else None
    row["loss_end"] = (sum(losses[-10:]) / 10) if stopped is None and len(losses) >= 10 else None
    row["acc_end"] = accuracy(model, test_x, test_y) if stopped is None else None
    row["status"] = stopped or f"ran {steps} steps"
    row["s_per_step"] = (time.time() - start) / max(1, len(losses))
    return row


def fmt(value, spec=".3g"):
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--steps", type=int, default=TRAIN // BATCH, help="default: one epoch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors = data()
    print(f"# {args.steps} steps of batch {BATCH} on synthetic 3x32x32 data "
          f"({TRAIN} train / {TEST} test, 10 classes), torch {torch.__version__}, CPU\n")
    print("| model | optimizer | lr | G-space share | float32 range warning | loss, first batch "
          "| mean loss, steps 11-20 | test acc after 20 steps | mean loss, last 10 steps "
          "| test acc after the epoch | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for entry in args.settings.split(","):
            setting, lr = entry.split(":")
            row = run(model_name, setting, float(lr), args.steps, tensors)
            print(f"| {row['model']} | {setting} | {lr} | {row['share']} | "
                  f"{row['range_warning']} | {fmt(row['loss0'])} | {fmt(row['loss11_20'])} | "
                  f"{fmt(row.get('acc20'), '.2f')} | {fmt(row['loss_end'])} | "
                  f"{fmt(row['acc_end'], '.2f')} | {row['status']} |", flush=True)


if __name__ == "__main__":
    main()
