"""The lines `gsgd train` prints around training (the trainer prints those during it, see
`gsgd_cli.train.progress`): the job's overrides and notes at the start, and a jobs-done line
after each job of a sweep.

    gsgd train: overrides: optimizer=sgd model.width=64
    gsgd train: G-SGD steps 100.0% of the 7872 trainable parameters (1 chain block)
    gsgd train: note: model=plain34 is the paper's Table 1 network, here on ...
    gsgd train: 3 of 80 jobs done in multirun/fig4/... (job 2: completed)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .hints import setting_note

SWEEP_RECORD = ".gsgd_sweep.json"   # in a sweep dir: the number of jobs of the latest sweep


def overrides_line(overrides: Iterable[str]) -> str:
    listed = " ".join(overrides)
    return f"overrides: {listed}" if listed else "overrides: none (the defaults of conf/train.yaml)"


def coverage_line(optimizer: Any) -> str | None:
    """G-SGD's share of the trainable parameters, for any model (Path-SGD and SGD: None)."""
    coverage = getattr(optimizer, "_coverage", None)   # GSGD's plan, also behind describe()
    if coverage is None or not coverage.total:
        return None
    share = 100 * coverage.in_blocks / coverage.total
    return (f"G-SGD steps {share:.1f}% of the {coverage.total} trainable parameters of "
            f"{coverage.model} in G-space ({len(coverage.blocks)} chain block(s))"
            + ("; the rest take plain SGD (why: gsgd inspect)" if share < 100 else ""))


def start_lines(optimizer: Any, choices: dict[str, Any] | None, cfg: Any) -> list[str]:
    lines = [line for line in (coverage_line(optimizer),) if line]
    note = setting_note(choices or {}, cfg)
    if note:
        lines.append("note: " + note)
    return lines


def sweep_size(task_overrides: Iterable[str], sweeper_params: dict[str, Any] | None) -> int | None:
    """Jobs of a basic-sweeper sweep: the product of the sweep lengths, the command line's
    values replacing the preset's `hydra.sweeper.params` of the same key."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        merged = {str(k): f"{k}={v}" for k, v in (sweeper_params or {}).items()}
        for item in task_overrides:
            merged[item.split("=", 1)[0].lstrip("+~")] = item
        total = 1
        for override in OverridesParser.create().parse_overrides(list(merged.values())):
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
        return total
    except Exception:   # an override this parser does not take: no total, the count still shows
        return None


def record_sweep_size(sweep_dir: Path, total: int | None) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_RECORD).write_text(json.dumps({"jobs": total}) + "\n")


def jobs_done_line(sweep_dir: Path, records_glob: str, num: int, status: str) -> str:
    done = len(list(sweep_dir.glob(records_glob)))
    try:
        total = json.loads((sweep_dir / SWEEP_RECORD).read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        total = None
    of = f" of {total}" if total else ""
    return f"{done}{of} jobs done in {sweep_dir} (job {num}: {status})"
