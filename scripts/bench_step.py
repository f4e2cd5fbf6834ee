#!/usr/bin/env python
"""Time torch.optim.SGD against GSGD (and Path-SGD) in the same run, and print the ratios.

    python scripts/bench_step.py                 # MLPs, batch 64, on cuda if present else cpu
    python scripts/bench_step.py --suite paper --batch 128 --optimizers sgd,gsgd,path_sgd
    python scripts/bench_step.py --suite paper --width 0.25 --rounds 3 --iters 2  # CPU-sized

For every model it measures, on the same device and with the same batch:
* the iteration: zero_grad + forward + backward + step, per optimizer;
* the step alone: `optimizer.step()` on fixed gradients.
Each figure is the median over `--rounds` rounds of the mean over `--iters` calls; the rounds of
the optimizers are interleaved so that background load hits them alike. Only the ratios
against SGD are meant to be compared across machines. The learning rate is 1e-12 so that the
weights hardly move while timing (the time of a step does not depend on it), and G-SGD uses
its default skeleton_init="one".
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.models import MLP, PlainNet, ResNet
from gsgd_cli.optim.gsgd import GSGD
from gsgd_cli.optim.path_sgd import PathSGD


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    classes: int


MLP_CASES = [
    Case("MLP [49:64:64:10]", lambda: MLP(49, 10, width=64, depth=2), (49,), 10),
    Case("MLP [49:1024:1024:10]", lambda: MLP(49, 10, width=1024, depth=2), (49,), 10),
    Case("MLP [784:1024:1024:1024:10]", lambda: MLP(784, 10, width=1024, depth=3), (784,), 10),
]

def paper_cases(width: float) -> list[Case]:
    """Plain-34 and ResNet-34 (CIFAR form), with and without batch norm; `width` scales the
    channels (1.0 = the paper's 64/128/256/512)."""
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    tag = "" if width == 1 else f" x{width:g} width"
    cases = []
    for cls, name in ((PlainNet, "Plain-34"), (ResNet, "ResNet-34")):
        for bn in (True, False):
            cases.append(Case(f"{name}{' BN' if bn else ''}{tag}",
                              lambda cls=cls, bn=bn: cls(3, 10, widths=widths, bn=bn),
                              (3, 32, 32), 10))
    return cases


OPTIMIZERS: dict[str, Callable[[nn.Module, float, tuple], torch.optim.Optimizer]] = {
    "sgd": lambda model, lr, shape: torch.optim.SGD(model.parameters(), lr=lr),
    "gsgd": lambda model, lr, shape: GSGD(model, lr=lr),
    "gsgd_eager": lambda model, lr, shape: GSGD(model, lr=lr, fused=False),
    "path_sgd": lambda model, lr, shape: PathSGD(model, lr=lr, input_shape=shape),
}


LR = 1e-12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_case(case: Case, optimizers: list[str], batch: int, rounds: int, iters: int,
               device: torch.device) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    x = torch.randn(batch, *case.in_shape, device=device)
    y = torch.randint(0, case.classes, (batch,), device=device)
    setups = {}
    for name in optimizers:
        torch.manual_seed(0)
        model = case.build().to(device)
        try:
            opt = OPTIMIZERS[name](model, LR, case.in_shape)
        except ValueError as exc:          # e.g. Path-SGD refuses batch norm
            print(f"  ({case.name}: {name} skipped: {str(exc).splitlines()[0][:90]})")
            continue

        def iteration(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def step(model=model, opt=opt):
            opt.step()

        setups[name] = (model, opt, iteration, step)
    for name, (model, opt, iteration, _) in setups.items():   # warm up
        for _ in range(3):
            iteration()
    iter_times = {name: [] for name in setups}
    step_times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (_, _, iteration, _) in setups.items():
            iter_times[name].append(_mean_time(iteration, iters, device))
    for name, (model, opt, _, step) in setups.items():   # fixed gradients for the step timing
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    for _ in range(rounds):
        for name, (_, _, _, step) in setups.items():
            step_times[name].append(_mean_time(step, iters, device))
    return {name: (statistics.median(iter_times[name]), statistics.median(step_times[name]))
            for name in setups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--optimizers", default="sgd,gsgd")
    parser.add_argument("--suite", default="mlp", choices=["mlp", "paper"],
                        help="mlp: the MLPs of the paper's 5.2; paper: Plain-34/ResNet-34")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier for --suite paper (1.0 = the paper's)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    optimizers = args.optimizers.split(",")
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or optimizers[0] != "sgd":
        parser.error(f"--optimizers must start with sgd and use only {', '.join(OPTIMIZERS)}")
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} CPU threads'}), "
          f"torch {torch.__version__}, batch {args.batch}, median of {args.rounds} rounds x "
          f"{args.iters} calls")
    header = "| model | " + " | ".join(
        f"{o} iter ms | {o} step ms" for o in optimizers) + " | " + " | ".join(
        f"{o}/sgd iter | {o}/sgd step" for o in optimizers[1:]) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    cases = MLP_CASES if args.suite == "mlp" else paper_cases(args.width)
    for case in cases:
        times = bench_case(case, optimizers, args.batch, args.rounds, args.iters, device)
        base_iter, base_step = times["sgd"]
        cells = [f"{times[o][0] * 1e3:.3f} | {times[o][1] * 1e3:.3f}" if o in times else "- | -"
                 for o in optimizers]
        ratios = [f"{times[o][0] / base_iter:.2f}x | {times[o][1] / base_step:.2f}x"
                  if o in times else "- | -" for o in optimizers[1:]]
        print(f"| {case.name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |",
              flush=True)


if __name__ == "__main__":
    main()
