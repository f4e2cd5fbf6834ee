"""`gsgd figures RUN_DIR... --out DIR`: the paper's figure forms as PNG and PDF.

    gsgd figures experiments/fig4/runs --out experiments/fig4

Draws from the completed runs found below the RUN_DIRs (as `gsgd report` finds them):

* `fig3_curves`       always: training loss (log) and test accuracy per epoch for every
                      (model, optimizer, swept values), mean over seeds with a min-max band
                      (Figure 3 form; Figures 7-8 too);
* `fig4_width_sweep`  when MLP widths are swept for SGD and G-SGD: final training loss and test
                      error against h and the gap SGD - G-SGD (Figure 4 form);
* `fig5_best_lr`      when the learning rate is swept: each optimizer at the rate with the
                      lowest mean final validation error (runs with data.val_size > 0), else
                      the lowest mean final training loss (Figure 5 form).

`--only` picks some of them. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsgd_cli import safe_files
from gsgd_cli.analysis import ReportError, build_rows, load_runs
from gsgd_cli.cli.report import OneLineParser

KINDS = ("curves", "width", "lr")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="gsgd figures",
        description="Draw the paper's figures (PNG and PDF) from gsgd train run directories.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories or folders above them (searched recursively)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the figures")
    parser.add_argument("--only", nargs="+", choices=KINDS, default=None,
                        help="curves: Figure 3 form; width: Figure 4; lr: Figure 5 "
                             "(default: every one the runs allow)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows, keys, incomplete = build_rows(load_runs(args.run_dirs))
        if not rows:
            raise ReportError(f"none of the {len(incomplete)} runs found completed, so there is "
                              "nothing to draw; `gsgd report` lists why.")
        from gsgd_cli.analysis import plots

        wanted = set(args.only or KINDS)
        out = Path(args.out)
        written: list[Path] = []
        if "width" in wanted:
            if plots.width_sweep_ready(rows, keys):
                written += plots.plot_width_sweep(rows, out)
            elif args.only:
                raise ReportError("--only width needs MLP runs of at least two model.width "
                                  "values for both sgd and gsgd (e.g. experiment=fig4).")
        if "lr" in wanted:
            if "optimizer.lr" in keys:
                written += plots.plot_best_lr(rows, keys, out)
            elif args.only:
                raise ReportError("--only lr needs runs that sweep optimizer.lr "
                                  "(e.g. experiment=fig5).")
        if "curves" in wanted:
            written += plots.plot_curves(rows, keys, out)
    except ReportError as exc:
        print(f"gsgd figures: error: {exc}", file=sys.stderr)
        return 2
    except safe_files.UnsafeFileError as exc:
        print(f"gsgd figures: error: not writing the figures: {exc}; or pass --out with "
              "another folder.", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gsgd figures: error: cannot write into {args.out}: {exc.strerror}; pass --out "
              "with a writable folder.", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if incomplete:
        print(f"gsgd figures: left out {len(incomplete)} incomplete runs (see gsgd report)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
