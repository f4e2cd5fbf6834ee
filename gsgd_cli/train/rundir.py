"""Who owns a run directory, and what a resumed run may change.

* `new_run_id()`: the suffix that makes default run and sweep directories unique
  (`outputs/<date>/<time>_<id>`): `$GSGD_RUN_ID` when set, else `<pid>-<4 random hex digits>`.
  Two processes alive at the same time never share a pid, and the random part separates hosts
  that share a file system. The Hydra resolver `${gsgd.run_id:}` calls it once per composed
  config (Hydra copies the resolver cache into every job of a sweep), so all jobs of one
  sweep agree; setting `GSGD_RUN_ID` makes several processes agree (e.g. the ranks of one
  distributed run).
* `RunDirectory`: what a directory already holds, whether that is a run, and the files that
  make one (removed by `overwrite=true`).
* `config_differences()`: the settings a resumed run changed, outside `RESUME_MAY_CHANGE`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from gsgd_cli.analysis.runs import flatten

from .errors import UserError

RUN_ID_ENV = "GSGD_RUN_ID"

# Files and folders a run writes (summary, metrics, checkpoint, TensorBoard, config).
SUMMARY, METRICS, CHECKPOINT, TB_DIR, HYDRA_DIR = (
    "summary.json", "metrics.jsonl", "checkpoint.pt", "tb", ".hydra")
BEST = "best.pt"   # train.keep_best (best.py)
RUN_FILES = (SUMMARY, METRICS, CHECKPOINT, TB_DIR, HYDRA_DIR, BEST)
# Temporary files of the atomic writers (`.checkpoint.pt.<random>.tmp`, `.summary.json.tmp`,
# ...); a kill between writing and renaming leaves them behind.
TMP_PATTERNS = (".*.tmp",)

# Keys of the composed config that `resume=true` may change: the budget (an extended budget
# gives the same result as a run started with it: the schedule's milestones are absolute),
# how often to evaluate and checkpoint, and where and how the job runs. `resume` and
# `overwrite` say what the command does, not how the run trains.
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.iterations", "train.eval_every", "train.checkpoint_every",
    "train.sync_every", "train.tensorboard",   # logging only (fig4/fig5 presets turned it on)
    "progress", "cpu_threads", "device", "data.root", "data.download", "data.system_dir",
    "resume", "overwrite",
})


# Settings added after checkpoints already recorded configs: a recorded config without the key
# was trained with this value (so resuming an older run with it is no change).
ADDED_LATER = {"train.cuda_graphs": False, "distributed.sync_bn": False,
               "train.keep_best": None}


def restrict_umask() -> None:
    """Add `o-w` to the process umask: nothing the runner writes is world-writable (anyone
    could otherwise replace a checkpoint or config in someone's run directory). Read
    permissions follow the user's umask, the same for every run file."""
    os.umask(os.umask(0o022) | 0o002)


def new_run_id() -> str:
    """`$GSGD_RUN_ID`, else `<pid>-<random>`: unique among processes (see the module doc)."""
    return os.environ.get(RUN_ID_ENV) or f"{os.getpid()}-{secrets.token_hex(2)}"


_ABSENT = object()


def config_differences(old: dict[str, Any], new: dict[str, Any],
                       may_change: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """`key: old -> new` for every setting outside `may_change` that differs, sorted by key."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in may_change:
            continue
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if x is _ABSENT and key in ADDED_LATER:
            x = ADDED_LATER[key]
        if not _same(x, y):
            out.append(f"{key}: {_show(x)} -> {_show(y)}")
    return out


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bool) != isinstance(y, bool):   # true == 1 in Python, not in a config
        return False
    return x == y


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


class RunDirectory:
    """The state of a run directory when a command starts, and the changes it may make.

    A directory *holds a run* when it has a checkpoint, metrics, TensorBoard events or a
    summary of a run that trained (a summary written only to say that a command failed
    before training, with no other file, does not count: rerunning with the fixed value is
    fine). Nothing here writes until `claim()`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.summary = self._read_summary()
        self.claimed = False

    def _read_summary(self) -> dict[str, Any] | None:
        try:
            summary = json.loads((self.path / SUMMARY).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def existing(self) -> list[str]:
        """Names of the run files present (`.hydra` and the summary included)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def holds_run(self) -> bool:
        if any((self.path / name).exists() for name in (CHECKPOINT, METRICS, TB_DIR)):
            return True
        if (self.path / SUMMARY).exists():
            s = self.summary
            return not (s is not None and s.get("status") == "failed" and not s.get("iterations"))
        return False

    @property
    def status(self) -> str | None:
        return None if self.summary is None else self.summary.get("status")

    def claim(self, *, remove_old: bool) -> None:
        """This command now writes here: remove the old run's files first when asked, and
        always the temporary files a killed writer left behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        if remove_old:
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        remove_orphaned_tmp(self.path)
        self.claimed = True


def remove_orphaned_tmp(folder: Path) -> list[Path]:
    """Delete `.checkpoint.pt.*.tmp` and other `.<name>.tmp` files of the atomic writers."""
    removed = []
    for pattern in TMP_PATTERNS:
        for tmp in folder.glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def check_resume_config(checkpoint: Path, recorded: dict[str, Any] | None,
                        config: dict[str, Any]) -> None:
    """Refuse (one `UserError` line) to resume a run under settings it was not trained with."""
    if recorded is None:
        raise UserError(f"cannot resume {checkpoint}: it was written by an older gsgd that did "
                        "not record the run's config, so the settings cannot be checked; "
                        "start a new run (another hydra.run.dir, or overwrite=true).")
    diffs = config_differences(recorded, config)
    if diffs:
        allowed = ", ".join(sorted(RESUME_MAY_CHANGE - {"resume", "overwrite"}))
        raise UserError(f"cannot resume {checkpoint.parent}: these settings differ from the "
                        f"checkpoint's run ({'; '.join(diffs)}). Resume with the original "
                        f"values (only {allowed} may change), or start a new run in another "
                        "hydra.run.dir.")
