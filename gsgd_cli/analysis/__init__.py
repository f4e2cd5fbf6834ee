"""Reading `gsgd train` run directories and summarising them (tables, figures).

Pure functions over the files a run writes (`summary.json`, `metrics.jsonl`, `.hydra/`):
`runs` finds and reads run directories, `table` aggregates them over seeds, `paper` holds the
paper's numbers, `plots` draws the paper's figure forms. The CLIs are `gsgd report` and
`gsgd figures` (gsgd_cli/cli/report.py, figures.py).
"""
from .runs import ReportError, Run, find_run_dirs, load_run, load_runs
from .table import Row, build_rows, markdown, swept_keys, to_csv

__all__ = ["ReportError", "Run", "Row", "build_rows", "find_run_dirs", "load_run", "load_runs",
           "markdown", "swept_keys", "to_csv"]
