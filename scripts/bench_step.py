#!/usr/bin/env python
"""Time SGD, G-SGD (fast and eager), Path-SGD, and Adam / RMSprop with G-Adam / G-RMSprop (fast
and eager) in the same run, and print ratios to SGD (G-Adam's to Adam's, G-RMSprop's to
RMSprop's, when those run too).

    python scripts/bench_step.py                          # MLPs, batch 64, cuda if present
    python scripts/bench_step.py --suite paper            # Plain-34/ResNet-34, batch 128
    python scripts/bench_step.py --suite all --json out.json
    python scripts/bench_step.py --e2e                    # `gsgd train` (1 epoch): G-SGD vs SGD
    python scripts/bench_step.py --suite adaptive --threads 2 \
        --optimizers sgd,adam,gadam,gadam_eager,rmsprop,grmsprop,grmsprop_eager   # issue 19

Figures, for every model and optimizer, on the same device and batch:
* iteration: zero_grad + forward + backward + step (with `--graphs` on CUDA also as one
  replayed CUDA graph, `gsgd_cli.train.step.GraphStep`);
* step: `optimizer.step()` alone, on fixed gradients.
Each figure is the mean over `--iters` calls, measured in `--rounds` rounds; the table gives
min / median / max over the rounds. The optimizers' rounds are interleaved (round r of every
optimizer, then round r + 1), so background load hits them alike, and each ratio to SGD is the
median over the rounds of (time / SGD's time in the same round). Only ratios compare across
machines. The learning rate is 1e-12, so the weights hardly move while timing (a step's time
does not depend on it); G-SGD uses its default skeleton_init="one".

`--e2e` runs the default `gsgd train` for one epoch (`train.epochs=1`; MLP [49:64:64:10] on
Fashion-MNIST 7x7) with G-SGD and with SGD, alternating, `--e2e-rounds` times, and reports the
wall time of the whole command and the training loop's own time (summary.json `wall_time_s`),
with their ratios. `--e2e-args` adds overrides (e.g. synthetic data where Fashion-MNIST is
missing).

OpenMP threads are told to sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`, set here before
torch is imported unless already set); `--threads` sets torch's thread count.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads libgomp

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from gsgd_cli.models import MLP, PlainNet, ResNet  # noqa: E402
from gsgd_cli.optim.gadam import GAdam, GRMSprop  # noqa: E402
from gsgd_cli.optim.gsgd import GSGD  # noqa: E402
from gsgd_cli.optim.path_sgd import PathSGD  # noqa: E402

LR = 1e-12


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    classes: int
    batch: int
    slow: bool = False      # CPU-heavy: fewer rounds by default


def mlp_cases(batch: int) -> list[Case]:
    return [
        Case("MLP [49:64:64:10]", lambda: MLP(49, 10, width=64, depth=2), (49,), 10, batch),
        Case("MLP [49:1024:1024:10]", lambda: MLP(49, 10, width=1024, depth=2), (49,), 10, batch),
        Case("MLP [784:1024x3:10]", lambda: MLP(784, 10, width=1024, depth=3), (784,), 10, batch),
    ]


def path_sgd_cases(batch: int) -> list[Case]:
    """Issue 18's Path-SGD targets: iteration <= 1.2x SGD's on these MLPs and <= 1.1x on
    Plain-34 without batch norm at 1/4 width (32x32 inputs), batch 64."""
    cases = mlp_cases(batch)[1:]
    cases += [Case(f"MLP [49:256x{d}:10]", lambda d=d: MLP(49, 10, width=256, depth=d), (49,),
                   10, batch) for d in (2, 8, 32)]
    widths = [round(w / 4) for w in (64, 128, 256, 512)]
    cases.append(Case("Plain-34 x0.25 width", lambda: PlainNet(3, 10, widths=widths, bn=False),
                      (3, 32, 32), 10, batch, slow=True))
    return cases


TARGETS = {"Plain-34 x0.25 width": 1.1}    # the rest of the path_sgd suite: 1.2


def adaptive_cases(batch: int) -> list[Case]:
    """Issue 19's targets: G-Adam's (G-RMSprop's) iteration <= 1.15x torch's Adam's (RMSprop's)
    on the MLPs and <= 1.1x on Plain-34 / ResNet-34 at 1/4 width (32x32 inputs), batch 64."""
    return mlp_cases(batch) + paper_cases(0.25, batch)


def adaptive_target(model: str) -> float:
    return 1.15 if model.startswith("MLP") else 1.1


def paper_cases(width: float, batch: int) -> list[Case]:
    """Plain-34 and ResNet-34 (CIFAR form), with and without batch norm; `width` scales the
    channels (1 = the paper's 64/128/256/512)."""
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    tag = "" if width == 1 else f" x{width:g} width"
    cases = []
    for cls, name in ((PlainNet, "Plain-34"), (ResNet, "ResNet-34")):
        for bn in (True, False):
            cases.append(Case(f"{name}{' BN' if bn else ''}{tag}",
                              lambda cls=cls, bn=bn: cls(3, 10, widths=widths, bn=bn),
                              (3, 32, 32), 10, batch, slow=True))
    return cases


OPTIMIZERS: dict[str, Callable[[nn.Module, tuple], torch.optim.Optimizer]] = {
    "sgd": lambda model, shape: torch.optim.SGD(model.parameters(), lr=LR),
    "gsgd": lambda model, shape: GSGD(model, lr=LR),
    "gsgd_eager": lambda model, shape: GSGD(model, lr=LR, fused=False),
    "path_sgd": lambda model, shape: PathSGD(model, lr=LR, input_shape=shape),
    "adam": lambda model, shape: torch.optim.Adam(model.parameters(), lr=LR),
    "gadam": lambda model, shape: GAdam(model, lr=LR, input_shape=shape),
    "gadam_eager": lambda model, shape: GAdam(model, lr=LR, input_shape=shape, fused=False),
    "rmsprop": lambda model, shape: torch.optim.RMSprop(model.parameters(), lr=LR),
    "grmsprop": lambda model, shape: GRMSprop(model, lr=LR, input_shape=shape),
    "grmsprop_eager": lambda model, shape: GRMSprop(model, lr=LR, input_shape=shape,
                                                    fused=False),
}
LABELS = {"sgd": "SGD", "gsgd": "G-SGD", "gsgd_eager": "G-SGD (eager)", "path_sgd": "Path-SGD",
          "adam": "Adam", "gadam": "G-Adam (/ Adam)", "gadam_eager": "G-Adam eager (/ Adam)",
          "rmsprop": "RMSprop", "grmsprop": "G-RMSprop (/ RMSprop)",
          "grmsprop_eager": "G-RMSprop eager (/ RMSprop)"}
# the optimizer each one's ratio is taken against, when it runs too (else SGD)
BASELINES = {"gadam": "adam", "gadam_eager": "adam", "grmsprop": "rmsprop",
             "grmsprop_eager": "rmsprop"}


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


def _stats(times: list[float], base: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {"min": ms[0], "median": statistics.median(ms), "max": ms[-1],
            "ratio": statistics.median(t / b for t, b in zip(times, base))}


def bench_case(case: Case, optimizers: list[str], rounds: int, iters: int,
               device: torch.device, graphs: bool) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    x = torch.randn(case.batch, *case.in_shape, device=device)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    notes, setups = [], {}
    for name in optimizers:
        torch.manual_seed(0)
        model = case.build().to(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = OPTIMIZERS[name](model, case.in_shape)
        except ValueError as exc:          # e.g. Path-SGD refuses batch norm
            notes.append(f"{LABELS[name]} on {case.name}: {str(exc).splitlines()[0][:100]}")
            continue

        def iteration(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        setups[name] = {"model": model, "opt": opt, "iteration": iteration}
        if graphs:
            from gsgd_cli.train.step import GraphStep

            g_model = case.build().to(device)
            g_opt = OPTIMIZERS[name](g_model, case.in_shape)
            g_step = GraphStep(g_model, g_opt)
            setups[name + "+graphs"] = {"model": g_model, "opt": g_opt,
                                        "iteration": lambda s=g_step: s(x, y)}
    for setup in setups.values():          # warm up (and build the fused kernel, capture)
        for _ in range(5):
            setup["iteration"]()
    _sync(device)
    iter_times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            iter_times[name].append(_mean_time(setup["iteration"], iters, device))
    step_times = {name: [] for name in setups if not name.endswith("+graphs")}
    for name in step_times:                # fixed gradients for the step timing
        setup = setups[name]
        setup["opt"].zero_grad(set_to_none=True)
        F.cross_entropy(setup["model"](x), y).backward()
    for _ in range(rounds):
        for name in step_times:
            step_times[name].append(_mean_time(setups[name]["opt"].step, iters, device))
    for setup in setups.values():          # nothing failed while timing
        check = getattr(setup["opt"], "check_steps", None)
        if check is not None:
            check()
    results = {}
    for name in setups:
        plain, graphs = name.split("+")[0], "+graphs" if name.endswith("+graphs") else ""
        base = BASELINES.get(plain, "sgd")
        base = base if base + graphs in setups else "sgd"
        results[name] = {"iteration_ms": _stats(iter_times[name], iter_times[base + graphs]),
                         "baseline": base}
        if name in step_times:
            results[name]["step_ms"] = _stats(step_times[name], step_times[base])
    return results, notes


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['min']:.3f} / {stats['median']:.3f} / {stats['max']:.3f}"


def _ratio(stats: dict | None, name: str, base: str = "sgd") -> str:
    if stats is None or name.split("+")[0] == base:
        return "1" if stats is not None else "-"
    return f"{stats['ratio']:.2f}x"


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"CPU, {torch.get_num_threads()} threads"


def run_steps(args, device: torch.device) -> list[dict]:
    batch_mlp = args.batch or 64
    batch_paper = args.batch or 128
    width = args.width if args.width is not None else (1.0 if device.type == "cuda" else 0.25)
    cases = []
    if args.suite in ("mlp", "all"):
        cases += mlp_cases(batch_mlp)
    if args.suite in ("paper", "all"):
        cases += paper_cases(width, batch_paper)
    if args.suite == "path_sgd":
        cases += path_sgd_cases(args.batch or 64)
    if args.suite == "adaptive":
        cases += adaptive_cases(args.batch or 64)
    optimizers = args.optimizers.split(",")
    step = ("the fused CPU kernel" if device.type == "cpu" and "gsgd" in optimizers
            else "the eager step")
    print(f"`python scripts/bench_step.py {' '.join(sys.argv[1:])}` on {device_line(device)}, "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"G-SGD = {step}; times in ms as min / median / max over the rounds; ratio = median "
          "over the rounds of time / the baseline's time in the same round (SGD's; Adam's or "
          "RMSprop's where the label says so)\n")
    print("| model | batch | optimizer | iteration ms | iteration / base | step ms | "
          "step / base |")
    print("|---|---|---|---|---|---|---|")
    records, notes = [], []
    for case in cases:
        rounds, iters = ((3, 2) if device.type == "cpu" else (5, 10)) if case.slow else (7, 20)
        rounds, iters = args.rounds or rounds, args.iters or iters
        results, case_notes = bench_case(case, optimizers, rounds, iters, device,
                                         args.graphs and device.type == "cuda")
        notes += case_notes
        for name, r in results.items():
            label = LABELS[name.split("+")[0]] + (" + CUDA graph" if "+graphs" in name else "")
            step = r.get("step_ms")
            print(f"| {case.name} | {case.batch} | {label} | {_cell(r['iteration_ms'])} | "
                  f"{_ratio(r['iteration_ms'], name, r['baseline'])} | {_cell(step)} | "
                  f"{_ratio(step, name, r['baseline'])} |",
                  flush=True)
            records.append({"model": case.name, "batch": case.batch, "optimizer": name,
                            "device": device_line(device), "rounds": rounds, "iters": iters,
                            **r})
    if notes:
        print()
        for note in notes:
            print(f"* not run: {note}")
    if args.suite == "path_sgd":
        print()
        for r in records:
            if r["optimizer"] == "path_sgd":
                target = TARGETS.get(r["model"], 1.2)
                ratio = r["iteration_ms"]["ratio"]
                verdict = "meets" if ratio <= target else "MISSES"
                print(f"* {r['model']}: Path-SGD iteration / SGD = {ratio:.2f}x, {verdict} the "
                      f"target <= {target}x")
    if args.suite == "adaptive":
        print()
        for r in records:
            if r["optimizer"] in ("gadam", "grmsprop") and r["baseline"] != "sgd":
                target = adaptive_target(r["model"])
                ratio = r["iteration_ms"]["ratio"]
                verdict = "meets" if ratio <= target else "MISSES"
                print(f"* {r['model']}: {LABELS[r['optimizer']]} iteration = {ratio:.2f}x, "
                      f"{verdict} the target <= {target}x")
    return records


def run_e2e(args) -> list[dict]:
    """The default `gsgd train` for one epoch, G-SGD and SGD alternating."""
    extra = args.e2e_args.split() if args.e2e_args else []
    rows = {"gsgd": [], "sgd": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.e2e_rounds):
            for opt in ("sgd", "gsgd"):
                run_dir = Path(tmp) / f"{opt}-{r}"
                cmd = [sys.executable, "-m", "gsgd_cli", "train", f"optimizer={opt}",
                       "train.epochs=1", f"hydra.run.dir={run_dir}", *extra]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    sys.exit(f"bench_step: `{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
                summary = json.loads((run_dir / "summary.json").read_text())
                rows[opt].append((wall, summary["wall_time_s"]))
    print(f"\n`python scripts/bench_step.py {' '.join(sys.argv[1:])}`: `gsgd train "
          f"train.epochs=1 {' '.join(extra)}` (one epoch, 937 iterations with the defaults), "
          f"{args.e2e_rounds} runs each, alternating; s as min / median / max\n")
    print("| optimizer | command wall s | training loop s (summary wall_time_s) |")
    print("|---|---|---|")
    stats = {}
    for opt in ("sgd", "gsgd"):
        walls = [w for w, _ in rows[opt]]
        loops = [t for _, t in rows[opt]]
        stats[opt] = {"wall_s": _stats(walls, [w for w, _ in rows["sgd"]]),
                      "loop_s": _stats(loops, [t for _, t in rows["sgd"]])}
        cell = lambda s: f"{s['min'] / 1e3:.2f} / {s['median'] / 1e3:.2f} / {s['max'] / 1e3:.2f}"
        print(f"| {LABELS[opt]} | {cell(stats[opt]['wall_s'])} | {cell(stats[opt]['loop_s'])} |")
    print(f"| G-SGD / SGD | {stats['gsgd']['wall_s']['ratio']:.2f}x | "
          f"{stats['gsgd']['loop_s']['ratio']:.2f}x |")
    return [{"e2e": opt, **stats[opt]} for opt in stats]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--suite", default="mlp",
                        choices=["mlp", "paper", "all", "none", "path_sgd", "adaptive"],
                        help="mlp: the MLPs of the paper's 5.2; paper: Plain-34/ResNet-34; "
                             "path_sgd: issue 18's Path-SGD cost targets (with "
                             "--optimizers sgd,path_sgd; prints each ratio against its target); "
                             "adaptive: issue 19's G-Adam/G-RMSprop targets (with --optimizers "
                             "sgd,adam,gadam,rmsprop,grmsprop; the same)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 64 for the MLPs, 128 for the paper's nets)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="default 7 (conv nets: 3 on the CPU, 5 on CUDA)")
    parser.add_argument("--iters", type=int, default=None,
                        help="calls per round (default 20; conv nets: 2 on the CPU, 10 on CUDA)")
    parser.add_argument("--optimizers", default=None,
                        help="default sgd,gsgd,gsgd_eager,path_sgd on the CPU (gsgd: the fused "
                             "kernel; gsgd_eager: fused=False), sgd,gsgd,path_sgd on CUDA "
                             "(where gsgd is the eager step)")
    parser.add_argument("--width", type=float, default=None,
                        help="channel multiplier of the conv nets (default: 1 on CUDA, 0.25 "
                             "on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA: also time each iteration as a replayed CUDA graph")
    parser.add_argument("--e2e", action="store_true",
                        help="also time `gsgd train train.epochs=1` with G-SGD against SGD")
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--e2e-args", default="", help="extra overrides for --e2e")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.optimizers is None:
        args.optimizers = ("sgd,gsgd,path_sgd" if device.type == "cuda"
                           else "sgd,gsgd,gsgd_eager,path_sgd")
    optimizers = args.optimizers.split(",")
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or optimizers[0] != "sgd":
        parser.error(f"--optimizers must start with sgd and use only {', '.join(OPTIMIZERS)}")
    records = run_steps(args, device) if args.suite != "none" else []
    if args.e2e:
        records += run_e2e(args)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
