"""`gsgd inspect [OVERRIDES...]`: a model's G-space structure, without loading any data.

    gsgd inspect model=mlp model.width=8 model.depth=2 data=fashion_mnist data.size=7
    gsgd inspect model=torchvision model.arch=resnet18 data=cifar10
    gsgd inspect --model torchvision.models.vgg11 --input-shape 3,32,32 --num-classes 10
    gsgd inspect --table5          # the paper's Table 5, ours beside the paper's

Prints what `GSGD(model, ...).describe()` prints, without touching the weights: each chain
block G-SGD would step (its layers, widths and pivot layer) with `m` (weights, biases
included, of the block; every kernel element of a convolution counts), `H` (hidden nodes:
features or channels), `m - H` (the dimension of G-space) and the invariant ratio `H/m`; then
the totals, the share of the parameters in G-space, every parameter that takes a plain SGD
step with the reason, and where chains end. Blocks that run through batch norm are marked as
the paper's approximation. The G-SGD options that shape the blocks come from the composed
`optimizer` config (when it is G-SGD) or from `--bn`, `--block-split`, `--valleys`.
"""
from __future__ import annotations

import importlib
import inspect as pyinspect
import sys
from typing import Any

from torch import nn

from ..gspace.blocks import ModelNotTraceable
from ..gspace.coverage import format_coverage, plan_blocks
from ..gspace.skeleton import UnsupportedWidthProfile

USAGE = """usage: gsgd inspect [OVERRIDES...] [--bn B] [--block-split S] [--valleys V]
       gsgd inspect --model DOTTED.NAME [--input-shape C,H,W] [--num-classes N] [--bn B] ...
       gsgd inspect --table5

Composes the same config as `gsgd train` (e.g. model=mlp model.width=8 data.size=7, or
model=torchvision model.arch=vgg11 data=cifar10) and prints the model's chain blocks with m, H,
m-H and H/m, its share of parameters in G-space and why the rest takes plain SGD. `--model`
inspects any importable model instead: a class or function (called with num_classes=N when
given) or a module object, e.g. torchvision.models.vgg11. `--input-shape` (one input, no batch
dimension) lets G-SGD check every flatten exactly. `--table5` prints the paper's Table 5 (MLP
[49:h:h:10], h = 8 ... 1024, no biases) with our counts beside the paper's."""

# Paper, appendix 11.6, Table 5: h -> (#weights m, H, printed "invariant ratio")
PAPER_TABLE5 = {
    8: (536, 16, 1.49e-2), 16: (1200, 32, 1.33e-2), 32: (2912, 64, 1.10e-2),
    64: (7872, 128, 8.13e-3), 128: (23936, 256, 5.35e-3), 256: (80640, 512, 3.17e-3),
    512: (292352, 1024, 1.75e-3), 1024: (1108992, 2048, 9.23e-4),
}
RATIO_REMARK = ("note: the paper's Table 5 prints h/m (one hidden layer's width over m) as the "
                "invariant ratio; by its definition the ratio is H/m, twice that for these "
                "two-hidden-layer MLPs. We report H/m.")
OPTION_FLAGS = {"--bn": "bn", "--block-split": "block_split", "--valleys": "valleys"}


def describe_structure(model: nn.Module, **options: Any) -> str:
    """What GSGD would step on `model` (options: bn, block_split, valleys, input_shape)."""
    coverage = plan_blocks(model, **options).coverage
    lines = [format_coverage(coverage)]
    hidden = [w for b in coverage.blocks for w in b.widths[1:-1]]
    if len(coverage.blocks) == 1 and len(hidden) == 2 and hidden[0] == hidden[1]:
        m = coverage.blocks[0].num_weights
        lines.append(f"h/m = {hidden[0] / m:.3e}; {RATIO_REMARK}")
    return "\n".join(lines)


def table5() -> str:
    from ..gspace.blocks import find_chain_blocks
    from ..models.mlp import MLP

    rows = ["| h | m | m (paper) | H | H (paper) | m - H | H/m | h/m | paper's ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for h, (paper_m, paper_h, paper_ratio) in PAPER_TABLE5.items():
        blocks = find_chain_blocks(MLP(49, 10, width=h, depth=2, bias=False)).blocks
        m, hidden = sum(b.num_weights for b in blocks), sum(b.num_hidden for b in blocks)
        rows.append(f"| {h} | {m} | {paper_m} | {hidden} | {paper_h} | {m - hidden} | "
                    f"{hidden / m:.3e} | {h / m:.3e} | {paper_ratio:.3g} |")
    return "\n".join(rows + ["", RATIO_REMARK])


class _Usage(ValueError):
    """A command-line mistake (printed as one line, exit 2)."""


def _take(args: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` or `flag=VALUE` from args and return VALUE."""
    for k, arg in enumerate(args):
        if arg == flag:
            if k + 1 >= len(args):
                raise _Usage(f"{flag} needs a value")
            value = args[k + 1]
            del args[k:k + 2]
            return value
        if arg.startswith(flag + "="):
            del args[k]
            return arg.split("=", 1)[1]
    return None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise _Usage(f"Invalid --input-shape={text!r}. Must be positive integers separated "
                     "by commas, e.g. 3,32,32 (one input, without the batch dimension).")
    return shape


def import_model(dotted: str, num_classes: int | None = None) -> nn.Module:
    """`package.module.name`: an nn.Module instance, or a class/function that builds one
    (called with `num_classes` when given and accepted, and `weights=None` for torchvision)."""
    module_name, _, attribute = dotted.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError):
        target = None
    if target is None:
        raise _Usage(f"cannot import --model {dotted!r}: give a dotted name such as "
                     "torchvision.models.vgg11 or mypackage.models.Net")
    if isinstance(target, nn.Module):
        return target
    kwargs: dict[str, Any] = {}
    try:
        parameters = pyinspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = {}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if num_classes is not None and ("num_classes" in parameters or accepts_any):
        kwargs["num_classes"] = num_classes
    if "weights" in parameters:
        kwargs["weights"] = None
    try:
        model = target(**kwargs)
    except Exception as exc:   # the model's own constructor
        raise _Usage(f"--model {dotted} could not be built with {kwargs or 'no arguments'}: "
                     f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise _Usage(f"--model {dotted} gave a {type(model).__name__}, not an nn.Module")
    return model


def _from_config(args: list[str]) -> tuple[nn.Module, dict[str, Any], str]:
    from hydra import compose, initialize_config_dir

    from ..data import describe
    from ..models import build_model
    from ..runner.conf import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args)
    in_shape, classes = describe(cfg.data)
    model = build_model(cfg.model, in_shape, classes)
    options: dict[str, Any] = {"input_shape": tuple(in_shape)}
    if str(cfg.optimizer.get("_target_", "")).endswith((".GSGD", ".GAdam", ".GRMSprop")):
        options.update({key: cfg.optimizer[key] for key in ("bn", "block_split", "valleys")
                        if cfg.optimizer.get(key) is not None})
    title = (f"model: {cfg.model.get('name', '?')}"
             + (f" ({cfg.model.arch})" if cfg.model.get("arch") else "")
             + f" for data '{cfg.data.get('name', '?')}' (input {tuple(in_shape)}, "
             f"{classes} classes)")
    return model, options, title


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if "--table5" in args:
        print(table5())
        return 0
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        flags = {key: _take(args, flag) for flag, key in OPTION_FLAGS.items()}
        dotted, shape = _take(args, "--model"), _take(args, "--input-shape")
        classes = _take(args, "--num-classes")
        if dotted is not None:
            if args:
                raise _Usage(f"--model takes no config overrides, got {' '.join(args)}")
            if classes is not None and not classes.isdigit():
                raise _Usage(f"Invalid --num-classes={classes!r}. Must be a positive integer.")
            model = import_model(dotted, int(classes) if classes else None)
            options: dict[str, Any] = {"input_shape": _shape(shape) if shape else None}
            title = f"model: {dotted} ({type(model).__name__})" + (
                f", input {options['input_shape']}" if shape else "")
        else:
            if shape is not None or classes is not None:
                raise _Usage("--input-shape and --num-classes go with --model; with a config "
                             "the data set decides them")
            model, options, title = _from_config(args)
        options.update({k: v for k, v in flags.items() if v is not None})
        text = describe_structure(model, **options)
    except (HydraException, OmegaConfBaseException, ValueError, ModelNotTraceable,
            UnsupportedWidthProfile) as exc:
        text = str(exc).split("Config search path")[0]   # drop Hydra's search-path dump
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = "; ".join(lines).replace(":; ", ": ") if lines else repr(exc)
        print(f"gsgd inspect: {message}", file=sys.stderr)
        return 2
    print(title)
    print(text)
    return 0
