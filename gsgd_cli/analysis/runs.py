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

import yaml

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
SKIP_DIRS = {".hydra", "tb", "__pycache__", ".git"}


class ReportError(Exception):
    """Input `gsgd report`/`gsgd figures` cannot use; the message is one line with the fix."""


def is_run_dir(path: Path) -> bool:
    return (path / HYDRA_CONFIG).is_file() or (path / SUMMARY).is_file()


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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


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


def _keep_env_as_text(tree: Any) -> Any:
    """Escape `${oc.env:...}`: a run directory is someone else's file, and resolving it would
    put the reader's environment variables (which may hold secrets) into the report."""
    if isinstance(tree, dict):
        return {k: _keep_env_as_text(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_keep_env_as_text(v) for v in tree]
    if isinstance(tree, str):
        return tree.replace("${oc.env:", "\\${oc.env:")
    return tree


def _resolved(tree: dict) -> dict:
    """The config with interpolations (`${lambda_wd}`) resolved where they can be outside the
    run; one that cannot, and `${oc.env:...}` (see `_keep_env_as_text`), stays as its text."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = _keep_env_as_text(tree)
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException:
        pass
    cfg = OmegaConf.create(tree)
    out = {}
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=False)).items():
        try:
            out[key] = OmegaConf.select(cfg, key, throw_on_missing=False)
            if OmegaConf.is_config(out[key]):
                out[key] = OmegaConf.to_container(out[key], resolve=True)
        except OmegaConfBaseException:
            out[key] = value
    return _unflatten(out)


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"cannot read {path} line {number}: {exc.msg}; the run was "
                              "probably killed mid-write: rerun it or delete that line.") from None
        if not isinstance(row, dict):
            raise ReportError(f"cannot read {path} line {number}: not a JSON object.")
        rows.append(row)
    return rows


def load_run(path: Path) -> Run:
    """Read one run directory. Raises `ReportError` for unreadable files of a finished run."""
    summary = None
    summary_path = path / SUMMARY
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"cannot read {summary_path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ReportError(f"cannot read {summary_path}: invalid JSON ({exc.msg}); rerun "
                              "that job or move the directory away.") from None
        if not isinstance(summary, dict):
            raise ReportError(f"cannot read {summary_path}: not a JSON object.")
    config: dict[str, Any] = {}
    overrides: list[str] = []
    for rel, target in ((HYDRA_CONFIG, "config"), (HYDRA_OVERRIDES, "overrides")):
        file = path / rel
        if not file.is_file():
            continue
        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ReportError(f"cannot read {file}: {str(exc).splitlines()[0]}") from None
        if target == "config":
            config = flatten(_resolved(data or {}))
        else:
            overrides = [str(x) for x in (data or [])]
    metrics: list[dict[str, Any]] = []
    problem = None
    if summary is None:
        problem = "no summary.json (still running, or killed)"
    elif summary.get("status") != "completed":
        message = summary.get("message")
        problem = f"status {summary.get('status')}" + (f": {message}" if message else "")
    metrics_path = path / METRICS
    if metrics_path.is_file():
        try:
            metrics = _read_json_lines(metrics_path)
        except ReportError:
            if problem is None:
                raise
            metrics = []
    elif problem is None:
        problem = "no metrics.jsonl"
    run = Run(path=path, config=config, summary=summary, metrics=metrics, overrides=overrides,
              problem=problem)
    if run.problem is None:
        missing = [k for k in ("final_test_acc", "best_test_acc", "final_train_loss")
                   if run.final(k) is None or not math.isfinite(run.final(k))]
        if missing:
            run.problem = f"completed but without {', '.join(missing)}"
    return run


def load_runs(paths: list[str | Path]) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(paths)]
