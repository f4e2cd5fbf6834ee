"""`gsgd inspect [OVERRIDES...]`: a model's G-space structure, without loading any data.

    gsgd inspect model=mlp model.width=8 model.depth=2 data=fashion_mnist data.size=7
    gsgd inspect --table5          # the paper's Table 5, ours beside the paper's

Prints each chain block (its layers, widths and pivot layer) with `m` (weights, biases
included, of the block; every kernel element of a convolution counts), `H` (hidden nodes:
features or channels), `m - H` (the dimension of G-space) and the invariant ratio `H/m`;
then the totals, and the parameters that take a plain SGD step. Blocks that run through
batch norm are marked as the paper's approximation.
"""
from __future__ import annotations

import sys

from torch import nn

from ..gspace.blocks import Discovery, find_chain_blocks
from ..gspace.skeleton import UnsupportedWidthProfile, check_single_peak, pivot_layer_of

USAGE = """usage: gsgd inspect [OVERRIDES...] | --table5

Composes the same config as `gsgd train` (e.g. model=mlp model.width=8 data.size=7) and prints
the model's chain blocks with m, H, m-H and H/m. `--table5` prints the paper's Table 5 (MLP
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


def _totals(discovery: Discovery) -> tuple[int, int]:
    return (sum(b.num_weights for b in discovery.blocks),
            sum(b.num_hidden for b in discovery.blocks))


def describe_structure(model: nn.Module) -> str:
    discovery = find_chain_blocks(model)
    lines = []
    for k, block in enumerate(discovery.blocks, 1):
        widths = block.widths
        m, h = block.num_weights, block.num_hidden
        try:
            check_single_peak(widths)
            pivot = f"pivot layer '{block.names[pivot_layer_of(widths)]}'"
        except UnsupportedWidthProfile as exc:
            pivot = f"NOT SUPPORTED by GSGD: {exc}"
        lines.append(f"chain block {k}: {' -> '.join(block.names)}")
        lines.append(f"  widths [{':'.join(map(str, widths))}], {pivot}")
        if block.bn_approx:
            after = [n for n, follows in zip(block.names, block.bn_after) if follows]
            lines.append(f"  batch norm after {len(after)} layer(s): APPROXIMATION (paper eq. "
                         "39: their gradients are scaled by each channel's filter norm; the "
                         "block is not exactly scale-invariant)")
        lines.append(f"  m = {m}, H = {h}, m - H = {m - h}, H/m = {h / m:.3e}")
    if not discovery.blocks:
        lines.append("no chain block found: GSGD would take a plain SGD step everywhere")
    m, h = _totals(discovery)
    total = sum(p.numel() for p in model.parameters())
    if discovery.blocks:
        lines.append(f"total over chain blocks: m = {m}, H = {h}, m - H = {m - h}, "
                     f"H/m = {h / m:.3e}")
    outside = discovery.outside
    outside_count = sum(p.numel() for _, p in outside)
    lines.append(f"parameters: {total} in all, {total - outside_count} in chain blocks, "
                 f"{outside_count} outside (plain SGD step)")
    shown = 12
    for name, p in outside[:shown]:
        lines.append(f"  outside: {name} {tuple(p.shape)}")
    if len(outside) > shown:
        lines.append(f"  ... and {len(outside) - shown} more parameter tensors outside")
    for note in discovery.notes:
        lines.append(f"  why not in a block: {note}")
    hidden = [w for b in discovery.blocks for w in b.widths[1:-1]]
    if len(discovery.blocks) == 1 and len(hidden) == 2 and hidden[0] == hidden[1]:
        lines.append(f"h/m = {hidden[0] / m:.3e}; {RATIO_REMARK}")
    return "\n".join(lines)


def table5() -> str:
    from ..models.mlp import MLP

    rows = ["| h | m | m (paper) | H | H (paper) | m - H | H/m | h/m | paper's ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for h, (paper_m, paper_h, paper_ratio) in PAPER_TABLE5.items():
        discovery = find_chain_blocks(MLP(49, 10, width=h, depth=2, bias=False))
        m, hidden = _totals(discovery)
        rows.append(f"| {h} | {m} | {paper_m} | {hidden} | {paper_h} | {m - hidden} | "
                    f"{hidden / m:.3e} | {h / m:.3e} | {paper_ratio:.3g} |")
    return "\n".join(rows + ["", RATIO_REMARK])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if "--table5" in args:
        print(table5())
        return 0
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..data import describe
    from ..models import build_model
    from .train import CONF_DIR

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=args)
        in_shape, classes = describe(cfg.data)
        model = build_model(cfg.model, in_shape, classes)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        text = str(exc).split("Config search path")[0]   # drop Hydra's search-path dump
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = "; ".join(lines).replace(":; ", ": ") if lines else repr(exc)
        print(f"gsgd inspect: {message}", file=sys.stderr)
        return 2
    print(f"model: {cfg.model.get('name', '?')} for data '{cfg.data.get('name', '?')}' "
          f"(input {tuple(in_shape)}, {classes} classes)")
    print(describe_structure(model))
    return 0
