"""Run the authors' G-space Adam / RMSprop (MSRA-COLT/gsgd) step by step beside our dense
float64 reference of G-Adam / G-RMSprop, on a small bias-free ReLU MLP, and print per-step
max relative differences of the weights for each of their variants.

    git --git-dir=<fetched MSRA-COLT/gsgd> worktree add /work/authors-gsgd HEAD   # or git archive
    PYTHONPATH=$PWD python scripts/compare_authors_adaptive.py --authors-repo /work/authors-gsgd

Their code is imported from `--authors-repo` (never copied into this repository): the classes
`gSGD_Adam` (`gsgd_cnn/opt/gopt_Adam.py` + `gopt_Adam_method.py`) and `gSGD_RMSprop`
(`gopt_RMSprop.py` + `gopt_RMSprop_method.py`). It runs on the CPU as it is (their masks
take a CPU branch); `torch.Tensor.cuda` is patched to a no-op from the outside in case a
CUDA-only call is reached, a missing `scipy` (imported, unused) is replaced by an empty module,
and their steps run with float64 as the default dtype (they allocate one buffer with
`torch.zeros`), so both sides compute in float64.

Each side computes its own gradient (mean squared error on one fixed batch) at its own
weights, so differences accumulate over the steps. Their code first sets every skeleton weight
to 1; ours starts from those same weights. Variants:

* `mlp`: their MLP path (`ec_step_mlp`; `adam_method` plays no part there);
* `cnn-*`: their CNN path (`ec_step_cnn`) on 1x1 convolutions over 1x1 images, which is the same
  MLP; with `bn=True` their `w_norm` (norm over input channels per output channel and kernel
  position) is then the whole filter norm, so it equals G-SGD's batch-norm approximation
  (`dw *= |w_row|` before the G-space step), which we apply on our side for the `bn` rows.

Columns: `ours` is our definition (torch's eps placement); `ours, eps mapped` passes
`eps / sqrt(1 - beta2^t)` at step t, which turns our eps placement into theirs (Adam only;
RMSprop has no bias correction); `ours, bn` applies the batch-norm approximation.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import types
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.gspace.adaptive import AdamOptions, RMSpropOptions
from gsgd_cli.gspace.skeleton import build_skeleton
from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.testing import reference_adaptive as refa

WIDTHS = [4, 6, 8, 5, 3]   # pivot layer 1: layers below, at and above the pivot all occur
BETAS = (0.9, 0.99)        # their gSGD_Adam's defaults
ALPHA = 0.99
EPS = 1e-8


def import_authors(repo: str):
    """Their two optimizer classes, imported from the checkout at `repo`."""
    root = os.path.join(repo, "gsgd_cnn")
    if not os.path.isdir(os.path.join(root, "opt")):
        sys.exit(f"error: {root}/opt not found: pass --authors-repo the root of a checkout "
                 "of MSRA-COLT/gsgd")
    for name in ("scipy", "scipy.sparse"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    if "scipy.sparse" in sys.modules and not hasattr(sys.modules["scipy"], "sparse"):
        sys.modules["scipy"].sparse = sys.modules["scipy.sparse"]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self      # CPU only, from the outside
    sys.path.insert(0, root)
    warnings.filterwarnings("ignore", category=UserWarning)
    adam = importlib.import_module("opt.gopt_Adam").gSGD_Adam
    rmsprop = importlib.import_module("opt.gopt_RMSprop").gSGD_RMSprop
    return adam, rmsprop


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Chain(nn.Module):
    """A bias-free ReLU chain as Linear layers or as 1x1 convolutions, with the `ec_layer`
    attribute their optimizers read (indices of the block's parameters)."""

    def __init__(self, widths, conv: bool, bias: bool = False):
        super().__init__()
        make = ((lambda a, b: nn.Conv2d(a, b, 1, bias=bias)) if conv
                else (lambda a, b: nn.Linear(a, b, bias=bias)))
        self.layers = nn.ModuleList(make(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.conv = conv
        step = 2 if bias else 1
        indices = [step * i for i in range(len(self.layers))]
        self.ec_layer = {"cnn": [indices] if conv else [], "mlp": [] if conv else [indices]}

    def forward(self, x):
        if self.conv:
            x = x[:, :, None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.flatten(1)

    def as_net(self) -> ref.Net:
        return ref.Net([l.weight.detach().reshape(l.weight.shape[:2]).clone()
                        for l in self.layers],
                       [None if l.bias is None else l.bias.detach().clone()
                        for l in self.layers])


def grad_at(net: ref.Net, x, y, bn: bool) -> torch.Tensor:
    weights = [w.clone().requires_grad_(True) for w in net.weights]
    biases = [None if b is None else b.clone().requires_grad_(True) for b in net.biases]
    loss = F.mse_loss(ref.forward(ref.Net(weights, biases), x), y)
    params = [t for pair in zip(weights, biases) for t in pair if t is not None]
    grads = list(torch.autograd.grad(loss, params))
    if bn:    # G-SGD's batch-norm approximation: dw of a row times the norm of that row
        k = 0
        for w, b in zip(net.weights, net.biases):
            grads[k] = grads[k] * w.norm(dim=1, keepdim=True)
            k += 1 if b is None else 2
    return torch.cat([g.reshape(-1) for g in grads])


def run_ours(net: ref.Net, x, y, kind: str, lr: float, steps: int, eps_mapped: bool,
             bn: bool) -> list[torch.Tensor]:
    basis = ref.skeleton_basis(net)
    state, flats = {}, []
    for t in range(1, steps + 1):
        grad = grad_at(net, x, y, bn)
        if kind == "adam":
            eps = EPS / (1 - BETAS[1] ** t) ** 0.5 if eps_mapped else EPS
            net, state = refa.gadam_step(net, grad, state, t,
                                         AdamOptions(lr=lr, betas=BETAS, eps=eps), basis)
        else:
            net, state = refa.grmsprop_step(net, grad, state,
                                            RMSpropOptions(lr=lr, alpha=ALPHA, eps=EPS), basis)
        flats.append(net.flat())
    return flats


def run_theirs(optimizer, model: Chain, x, y, steps: int) -> list[torch.Tensor]:
    flats = []
    for _ in range(steps):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        with default_dtype(torch.float64):
            optimizer.step()
        flats.append(model.as_net().flat())
    return flats


def make_theirs(classes, kind: str, model: Chain, lr: float, bn: bool, method: str):
    """Their optimizer on `model` (this sets every skeleton weight of the block to 1)."""
    adam, rmsprop = classes
    args = SimpleNamespace(ec_layer_type=0, device="cpu", ecopt="ec", inner_opt=kind,
                           adam_method=method, rmsprop_method=method)
    with torch.no_grad():
        if kind == "adam":
            return adam(models=model, lr=lr, args=args, betas=BETAS, eps=EPS, bn=bn)
        return rmsprop(models=model, lr=lr, args=args, alpha=ALPHA, eps=EPS, bn=bn)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def first_move_ratios(start: ref.Net, theirs: torch.Tensor, ours: torch.Tensor) -> list[str]:
    """Per weight layer: median over its non-skeleton weights of (their move) / (our move) in
    the first step (1.00 where both take the same step); then the same over the pivots."""
    basis = ref.skeleton_basis(start)
    weight_id, _, _ = start.edge_ids()
    skeleton = set(basis.free) | set(basis.pivots)
    w0 = start.flat()
    ratios = []
    for ids in weight_id:
        edges = [e for row in ids for col in row for e in col if e not in skeleton]
        ratio = (theirs[edges] - w0[edges]) / (ours[edges] - w0[edges])
        ratios.append(f"{float(ratio.median()):.3f}")
    pivots = list(basis.pivots)
    ratio = (theirs[pivots] - w0[pivots]) / (ours[pivots] - w0[pivots])
    return ratios + [f"| pivots {float(ratio.median()):.3f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", required=True,
                        help="root of a checkout of MSRA-COLT/gsgd (kept outside this repo)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", action="store_true",
                        help="give every layer a bias (their code steps biases with "
                             "weight-space Adam / RMSprop; ours puts them in G-space)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the variants our definition claims to equal "
                             "(mlp and cnn noweight bn=False; Adam with eps mapped) agree "
                             "to 1e-12 at every step")
    options = parser.parse_args(argv)
    failures = []
    classes = import_authors(options.authors_repo)
    torch.manual_seed(options.seed)
    x = torch.randn(32, WIDTHS[0], dtype=torch.float64)
    y = torch.randn(32, WIDTHS[-1], dtype=torch.float64)
    lrs = {"adam": 1e-2, "rmsprop": 1e-3}
    variants = [  # (name, kind, conv, bn, method)
        ("adam mlp", "adam", False, False, "noweight"),
        ("adam cnn noweight bn=False", "adam", True, False, "noweight"),
        ("adam cnn noweight bn=True", "adam", True, True, "noweight"),
        ("adam cnn weight bn=True", "adam", True, True, "weight"),
        ("rmsprop mlp", "rmsprop", False, False, "noweight"),
        ("rmsprop cnn noweight bn=False", "rmsprop", True, False, "noweight"),
        ("rmsprop cnn noweight bn=True", "rmsprop", True, True, "noweight"),
        ("rmsprop cnn weight bn=True", "rmsprop", True, True, "weight"),
    ]
    print(f"widths {WIDTHS}, bias={options.bias}, float64, lr adam {lrs['adam']} "
          f"rmsprop {lrs['rmsprop']}, betas {BETAS}, alpha {ALPHA}, eps {EPS}; "
          "max |w_theirs - w_ours| / max |w_ours| after each step")
    for name, kind, conv, bn, method in variants:
        torch.manual_seed(options.seed + 1)
        model = Chain(WIDTHS, conv, options.bias).to(torch.float64)
        optimizer = make_theirs(classes, kind, model, lrs[kind], bn, method)
        start = model.as_net()                   # after their skeleton init (all ones)
        theirs = run_theirs(optimizer, model, x, y, options.steps)
        columns = {"ours": run_ours(start, x, y, kind, lrs[kind], options.steps, False, False)}
        if kind == "adam":
            columns["ours, eps mapped"] = run_ours(start, x, y, kind, lrs[kind], options.steps,
                                                   True, False)
        if bn:
            columns["ours, bn"] = run_ours(start, x, y, kind, lrs[kind], options.steps,
                                           kind == "adam", True)
            if kind == "adam":
                columns["ours, bn, eps mapped"] = columns.pop("ours, bn")
        print(f"\n{name}")
        print("  step  " + "  ".join(f"{c:>22}" for c in columns))
        for t in range(options.steps):
            print(f"  {t + 1:4d}  " + "  ".join(f"{max_rel(theirs[t], columns[c][t]):22.3e}"
                                                for c in columns))
        if not bn and not options.bias and options.check:
            exact = "ours, eps mapped" if kind == "adam" else "ours"
            worst = max(max_rel(a, b) for a, b in zip(theirs, columns[exact]))
            if worst > 1e-12:
                failures.append(f"{name}: {worst:.3e} against '{exact}'")
        last = list(columns)[-1]
        print(f"  step 1, their move / our move ({last}), median over the non-skeleton "
              f"weights of each layer (pivot layer {build_skeleton(WIDTHS).pivot_layer}): "
              + " ".join(first_move_ratios(start, theirs[0], columns[last][0])))
    if failures:
        sys.exit("error: expected agreement to 1e-12 failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
