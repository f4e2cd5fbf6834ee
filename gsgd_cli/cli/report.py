"""`gsgd report RUN_DIR... [--csv PATH]`: a markdown table (stdout) and a CSV of run directories.

    gsgd report experiments/fig4/runs                      # a multirun's sweep directory
    gsgd report outputs/2026-11-27 --csv results.csv       # every run below a folder

One row per (data, model, optimizer, swept config keys): mean ± std over seeds of the final and
best test error and the final training loss, the number of seeds, and the paper's figure where
the paper has one. Runs without a summary.json or whose status is not `completed` are listed
under the table and left out of the means. The CSV goes to `--csv`, by default `report.csv` in
the first RUN_DIR. `--epoch N` reports every run as it stood after N epochs. `--gap` adds Figure 4's comparison (the gap SGD - G-SGD per MLP width, with
its standard error over seeds); `--gap-error best` makes its test error each run's best over its
evaluations instead of the last one. `--best` adds the best setting of every (data, model, optimizer), chosen on
the validation split when the runs have one (else by training loss), never on the test set.
Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsgd_cli import safe_files
from gsgd_cli.analysis import ReportError, build_rows, load_runs, markdown, to_csv
from gsgd_cli.analysis.gap import width_gap_markdown
from gsgd_cli.analysis.table import best_markdown, refused_before_training


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr (exit code 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="gsgd report",
        description="Summarise gsgd train run directories (single runs or multirun sweep "
                    "directories, searched recursively) as a markdown table and a CSV.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories or folders above them")
    parser.add_argument("--csv", metavar="PATH", default=None,
                        help="where to write the CSV (default: RUN_DIR/report.csv of the first "
                             "RUN_DIR); '-' to skip it")
    parser.add_argument("--best", action="store_true",
                        help="also print the best setting of every (data, model, optimizer): "
                             "lowest mean final validation error when the runs held out a "
                             "validation split (data.val_size > 0), else lowest mean final "
                             "training loss; never the test error")
    parser.add_argument("--epoch", type=float, default=None, metavar="N",
                        help="report every run as it stood after N epochs (from its "
                             "metrics.jsonl), e.g. an early point of a long sweep")
    parser.add_argument("--gap", action="store_true",
                        help="also print Figure 4's comparison: per MLP width run with SGD and "
                             "G-SGD, the gap SGD - G-SGD of the final training loss and test "
                             "error with its standard error over seeds")
    parser.add_argument("--gap-error", choices=("final", "best"), default=None,
                        help="test error of the --gap table (implies --gap): final (after the "
                             "last epoch, the default) or best (each run's best over its "
                             "evaluations, an epoch chosen on the test set)")
    parser.add_argument("--all", action="store_true",
                        help="also list the folders of commands refused before training (a "
                             "bad override leaves a failed summary.json and no metrics)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = load_runs(args.run_dirs)
        hidden = 0
        if not args.all:
            refused = [run for run in runs if refused_before_training(run)]
            hidden, runs = len(refused), [run for run in runs if run not in refused]
        if args.epoch is not None:
            if not args.epoch > 0:
                raise ReportError(f"--epoch {args.epoch:g}: must be a number of epochs > 0.")
            runs = [run.at_epoch(args.epoch) for run in runs]
        rows, keys, incomplete = build_rows(runs)
        text = markdown(rows, keys, incomplete, hidden)
        if (args.gap or args.gap_error) and rows:
            gap = width_gap_markdown(rows, test_error=args.gap_error or "final")
            if not gap:
                raise ReportError("--gap needs MLP runs of the same model.width with both sgd "
                                  "and gsgd (e.g. experiment=fig4).")
            which = " (best test error over the evaluations)" if args.gap_error == "best" else ""
            text += f"\nSGD against G-SGD per width (Figure 4){which}:\n\n" + gap
        if args.best and rows:
            text += "\nBest setting per data set, model and optimizer:\n\n" + best_markdown(rows, keys)
        csv_path = None
        if args.csv != "-":
            csv_path = Path(args.csv) if args.csv else Path(args.run_dirs[0]) / "report.csv"
            try:
                safe_files.make_dir(csv_path.parent)
                safe_files.write_atomic(csv_path, to_csv(rows, keys))
            except safe_files.UnsafeFileError as exc:
                raise ReportError(f"not writing the CSV: {exc}; or pass --csv with another "
                                  "path (--csv - for none).") from None
            except OSError as exc:
                raise ReportError(f"cannot write {csv_path}: {exc.strerror}; pass --csv "
                                  "with a writable path.") from None
    except ReportError as exc:
        print(f"gsgd report: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    n_ok = len(runs) - len(incomplete)
    note = f"gsgd report: {n_ok} of {len(runs)} runs completed, {len(rows)} rows"
    print(note + (f"; CSV: {csv_path}" if csv_path else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
