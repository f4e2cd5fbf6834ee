"""Finding and reading the run directories that `gsgd train` writes.

A run directory holds `.hydra/config.yaml` (the composed config), `summary.json` (written when
the run ends, also after a failure) and `metrics.jsonl` (one JSON object per evaluation).
`find_run_dirs` walks the given paths recursively, so a single run, a multirun's sweep
directory or any folder above them can be passed. `load_run` reads one directory into a `Run`.

Only these files are read; nothing is imported from the training code, so old runs stay
readable when the trainer changes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsgd_cli.config_tree import flatten

from . import run_files

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
SKIP_DIRS = {".hydra", "tb", "__pycache__", ".git"}


class ReportError(Exception):
    """Input `gsgd report`/`gsgd figures` cannot use; the message is one line with the fix."""


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() or (path / name).is_symlink()
               for name in (HYDRA_CONFIG, SUMMARY))


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every run directory at or below `paths`, in a stable order (numeric-aware)."""
    found: list[Path] = []
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise ReportError(f"{root} does not exist; pass a run directory or a sweep "
                              "directory written by `gsgd train`.")
        if not root.is_dir():
            raise ReportError(f"{root} is not a directory; pass the run directory that holds "
                              "summary.json, not a file in it.")
        stack = [root]
        while stack:
            path = stack.pop()
            if is_run_dir(path):
                found.append(path)
                continue  # a run directory has no runs below it
            try:
                children = sorted(p for p in path.iterdir() if p.is_dir() and p.name not in SKIP_DIRS)
            except OSError as exc:
                raise ReportError(f"cannot list {path}: {exc.strerror}; check its permissions.") from None
            stack.extend(reversed(children))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        shown = ", ".join(str(p) for p in paths)
        raise ReportError(f"no run directories found under {shown} (a run directory holds "
                          ".hydra/config.yaml or summary.json); pass the hydra.run.dir or "
                          "hydra.sweep.dir that `gsgd train` wrote.")
    return sorted(unique, key=_natural_key)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


@dataclass
class Run:
    path: Path
    config: dict[str, Any]            # flattened .hydra/config.yaml (empty when missing)
    summary: dict[str, Any] | None    # summary.json, None when the run never wrote one
    metrics: list[dict[str, Any]]     # metrics.jsonl lines
    overrides: list[str] = field(default_factory=list)
    problem: str | None = None        # why the run is left out of the means, if it is

    @property
    def status(self) -> str:
        if self.summary is None:
            return "no summary.json"
        return str(self.summary.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def seed(self) -> Any:
        if self.summary is not None and "seed" in self.summary:
            return self.summary["seed"]
        return self.config.get("seed")

    def choice(self, group: str) -> str:
        """The config group option (`sgd`, `resnet34`, ...), as recorded by the runner."""
        choices = (self.summary or {}).get("config") or {}
        if choices.get(group):
            return str(choices[group])
        for line in self.overrides:
            if line.startswith(f"{group}="):
                return line.split("=", 1)[1]
        if group == "optimizer":
            target = str(self.config.get("optimizer._target_", ""))
            for name, marker in (("path_sgd", "path_sgd"), ("gsgd", "gsgd.GSGD"),
                                 ("gadam", "gadam.GAdam"), ("grmsprop", "gadam.GRMSprop"),
                                 ("adam", "make_adam"), ("rmsprop", "make_rmsprop"),
                                 ("sgd", "sgd")):
                if marker in target:
                    return name
        return str(self.config.get(f"{group}.name", "?"))

    def final(self, key: str) -> float | None:
        """`final_test_acc`, `best_test_acc` or `final_train_loss`: summary first, then metrics."""
        value = (self.summary or {}).get(key)
        if value is None and self.metrics:
            if key == "best_test_acc":
                value = max(m["test_acc"] for m in self.metrics)
            else:
                value = self.metrics[-1].get(key.replace("final_", "", 1))
        return None if value is None else float(value)

    def at_epoch(self, epoch: float) -> "Run":
        """The run as it stood after `epoch` epochs: its metrics up to the evaluation at that
        epoch, the final values taken from that evaluation (val accuracy too) and the best test
        accuracy from the evaluations up to it. A run without an evaluation at that epoch (a
        shorter or unfinished run) is left out of the means with a reason."""
        kept = [m for m in self.metrics if m.get("epoch") is not None and m["epoch"] <= epoch]
        if self.problem is not None:
            return Run(self.path, self.config, self.summary, kept, self.overrides, self.problem)
        if not kept or kept[-1]["epoch"] != epoch:
            last = self.metrics[-1].get("epoch") if self.metrics else None
            return Run(self.path, self.config, self.summary, kept, self.overrides,
                       f"no evaluation at epoch {epoch:g} (its last is at epoch {last})")
        at = kept[-1]
        summary = {**(self.summary or {}), "final_test_acc": at["test_acc"],
                   "final_train_loss": at["train_loss"], "final_test_loss": at.get("test_loss"),
                   "best_test_acc": max(m["test_acc"] for m in kept), "epochs": at["epoch"]}
        if "val_acc" in at:
            summary["final_val_acc"] = at["val_acc"]
        return Run(self.path, self.config, summary, kept, self.overrides)


METRIC_ROW_KEYS = ("iteration", "epoch", "train_loss", "test_acc")   # every row has them
SUMMARY_NUMBERS = ("final_test_acc", "best_test_acc", "final_test_loss", "final_train_loss",
                   "final_train_acc", "final_val_acc", "best_val_acc", "final_val_loss",
                   "iterations", "epochs", "wall_time_s")


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    text = run_files.read_text(path, run_files.METRICS_LIMIT)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = run_files.parse_json(line, path, f" line {number}")
        except json.JSONDecodeError as exc:
            raise ReportError(f"cannot read {path} line {number}: {exc.msg}; the run was "
                              "probably killed mid-write: rerun it or delete that line.") from None
        if not isinstance(row, dict):
            raise ReportError(f"cannot read {path} line {number}: not a JSON object.")
        rows.append(row)
    return rows


def _metrics_problem(rows: list[dict[str, Any]]) -> str | None:
    """Why these metrics rows cannot be used (a key missing, a value that is no number)."""
    for number, row in enumerate(rows, 1):
        for key in METRIC_ROW_KEYS + tuple(k for k in ("val_acc", "test_loss") if k in row):
            if key not in row:
                return f"metrics.jsonl row {number} has no {key}"
            bad = run_files.number_problem(row[key])
            if bad is None and row[key] is None and key in ("iteration", "epoch"):
                bad = "is null"
            if bad:
                return f"metrics.jsonl row {number}: {key} {bad}"
    return None


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """Why this summary cannot be used (a metric that is no number, `config` not a mapping)."""
    for key in SUMMARY_NUMBERS:
        bad = run_files.number_problem(summary.get(key))
        if bad:
            return f"summary.json: {key} {bad}"
    config = summary.get("config")
    if config is not None and not (isinstance(config, dict) and all(
            isinstance(v, (str, type(None))) for v in config.values())):
        return "summary.json: config is not a mapping of config groups to names"
    for key in ("status", "message"):
        if summary.get(key) is not None and not isinstance(summary[key], str):
            return f"summary.json: {key} is not text"
    seed = summary.get("seed")
    if seed is not None and not isinstance(seed, (int, str)):
        return "summary.json: seed is not an integer"
    return None


def load_run(path: Path) -> Run:
    """Read one run directory. Raises `ReportError` for unreadable JSON or YAML of a run; a file
    that is unsafe to read (a link, a special or oversized file) or of the wrong shape leaves
    the run out of the means with the reason (`Run.problem`)."""
    try:
        return _load_run(path)
    except run_files.RunFileError as exc:
        return Run(path=path, config={}, summary=None, metrics=[], problem=f"skipped: {exc}")


def _load_run(path: Path) -> Run:
    summary = None
    summary_path = path / SUMMARY
    if _present(summary_path):
        try:
            summary = run_files.parse_json(
                run_files.read_text(summary_path, run_files.JSON_LIMIT), summary_path)
        except json.JSONDecodeError as exc:
            raise ReportError(f"cannot read {summary_path}: invalid JSON ({exc.msg}); rerun "
                              "that job or move the directory away.") from None
        if not isinstance(summary, dict):
            raise ReportError(f"cannot read {summary_path}: not a JSON object.")
    config: dict[str, Any] = {}
    overrides: list[str] = []
    for rel, target in ((HYDRA_CONFIG, "config"), (HYDRA_OVERRIDES, "overrides")):
        file = path / rel
        if not _present(file):
            continue
        try:
            data = run_files.read_yaml(file)
        except run_files.RunFileError as exc:
            if "cannot read" in str(exc):
                raise ReportError(str(exc)) from None
            raise
        if target == "config":
            if data is not None and not isinstance(data, dict):
                raise run_files.RunFileError(f"{file} is not a mapping")
            config = run_files.resolve_references(flatten(data or {}))
        else:
            if data is not None and not isinstance(data, list):
                raise run_files.RunFileError(f"{file} is not a list of overrides")
            overrides = [str(x) for x in (data or [])]
    metrics: list[dict[str, Any]] = []
    problem = None
    if summary is None:
        problem = "no summary.json (still running, or killed)"
    else:
        problem = _summary_problem(summary)
        if problem is None and summary.get("status") != "completed":
            message = summary.get("message")
            problem = f"status {summary.get('status')}" + (f": {message}" if message else "")
    metrics_path = path / METRICS
    if _present(metrics_path):
        try:
            metrics = _read_json_lines(metrics_path)
        except ReportError:
            if problem is None:
                raise
            metrics = []
        problem = problem or _metrics_problem(metrics)
    elif problem is None:
        problem = "no metrics.jsonl"
    if problem is not None and problem.startswith(("summary.json:", "metrics.jsonl")):
        summary, metrics = None, []   # neither is used for a skipped run
        problem = f"skipped: {problem}"
    run = Run(path=path, config=config, summary=summary, metrics=metrics, overrides=overrides,
              problem=problem)
    if run.problem is None:
        missing = [k for k in ("final_test_acc", "best_test_acc", "final_train_loss")
                   if run.final(k) is None or not math.isfinite(run.final(k))]
        if missing:
            run.problem = f"completed but without {', '.join(missing)}"
    return run


def _present(path: Path) -> bool:
    """Exists, or is a link (read, and refused, rather than silently ignored)."""
    return path.exists() or path.is_symlink()


def load_runs(paths: list[str | Path]) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(paths)]
