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
import stat
from pathlib import Path
from typing import Any

from gsgd_cli import safe_files
from gsgd_cli.config_tree import flatten

from gsgd_cli.errors import UserError
from .runlock import LOCK_FILE

RUN_ID_ENV = "GSGD_RUN_ID"

# Files and folders a run writes (summary, metrics, checkpoint, TensorBoard, config).
SUMMARY, METRICS, CHECKPOINT, TB_DIR, HYDRA_DIR = (
    "summary.json", "metrics.jsonl", "checkpoint.pt", "tb", ".hydra")
BEST = "best.pt"   # train.keep_best (best.py)
RUN_FILES = (SUMMARY, METRICS, CHECKPOINT, TB_DIR, HYDRA_DIR, BEST)
# Temporary files of the atomic writers (`.checkpoint.pt.<random>.tmp`, `.summary.json.tmp`,
# ...); a kill between writing and renaming leaves them behind.
TMP_PATTERNS = (".*.tmp",)
# What else may be in a run directory: the lock (`runlock`) and `gsgd report`'s default CSV.
OTHER_OWN_FILES = (LOCK_FILE, "report.csv")
SUMMARY_LIMIT = 1 << 20    # bytes: a summary is a few hundred

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
        self.refused = False   # a check refused it: this command writes nothing there

    def _read_summary(self) -> dict[str, Any] | None:
        try:
            summary = json.loads(safe_files.read_text(self.path / SUMMARY, SUMMARY_LIMIT))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return None
        return summary if isinstance(summary, dict) else None

    def check(self) -> None:
        """Refuse (one `UserError` line) a directory this command must not write into: one
        whose run files are links (they could point anywhere) or of the wrong kind (a FIFO, a
        device, a folder named summary.json). A refused directory is never written to."""
        try:
            self._check()
        except UserError:
            self.refused = True
            raise

    def check_new(self) -> None:
        """For a new run (`overwrite=true` included): refuse a folder holding files `gsgd
        train` did not write, so that nothing else is removed or mixed with the run."""
        if not self.path.is_dir():
            return
        foreign = sorted(child.name for child in self.path.iterdir() if not _own(child.name))
        if foreign:
            self.refused = True
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise UserError(f"{self.path} is not a run directory: it holds files gsgd train "
                            f"did not write ({shown}), which a run would mix with (or "
                            "overwrite=true delete) its own. Choose a new or empty "
                            "hydra.run.dir.")

    def _check(self) -> None:
        where = self.path
        try:
            info = os.stat(where)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            raise UserError(f"the run directory {where} exists and is not a directory; choose "
                            "another hydra.run.dir.")
        hydra = where / HYDRA_DIR
        names = [*RUN_FILES, LOCK_FILE]
        if hydra.is_dir() and not safe_files.is_link(hydra):
            names += [f"{HYDRA_DIR}/{child.name}" for child in hydra.iterdir()]
        links = safe_files.links_among(where, names)
        if links:
            raise UserError(f"{where} holds symbolic links ({', '.join(links)}); gsgd never "
                            "writes through a link, which could point anywhere: remove them, or "
                            "choose another hydra.run.dir.")
        for name, want_dir in ((SUMMARY, False), (METRICS, False), (CHECKPOINT, False),
                               (TB_DIR, True), (HYDRA_DIR, True), (LOCK_FILE, False)):
            try:
                mode = os.lstat(where / name).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode) != want_dir or not (want_dir or stat.S_ISREG(mode)):
                raise UserError(f"{where / name} is {safe_files._kind(mode)}, not the "
                                f"{'folder' if want_dir else 'file'} gsgd train writes there; "
                                "move it away, or choose another hydra.run.dir.")

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def existing(self) -> list[str]:
        """Names of the run files present (`.hydra` and the summary included)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def holds_run(self) -> bool:
        if self.refused:   # not ours to write to, whatever it holds
            return True
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
        safe_files.make_dir(self.path)
        if remove_old:
            for name in RUN_FILES:
                safe_files.remove(self.path / name)
        remove_orphaned_tmp(self.path)
        self.claimed = True


def _own(name: str) -> bool:
    """Is `name` a file `gsgd train` (or `gsgd report`) writes into a run directory?"""
    return (name in RUN_FILES or name in OTHER_OWN_FILES
            or (name.startswith(".") and name.endswith(".tmp")))


def remove_orphaned_tmp(folder: Path) -> list[Path]:
    """Delete `.checkpoint.pt.*.tmp` and other `.<name>.tmp` files of the atomic writers."""
    removed = []
    for pattern in TMP_PATTERNS:
        for tmp in folder.glob(pattern):
            if tmp.is_file() or safe_files.is_link(tmp):   # a link: removed, not followed
                safe_files.remove(tmp)
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


def check_configured_dir(value: Any, key: str = "hydra.run.dir") -> None:
    """An empty `hydra.run.dir=` (e.g. an unset shell variable) would make the current
    directory the run directory: refuse it."""
    if value is None or not str(value).strip():
        raise UserError(f"{key} is empty (an unset shell variable?); it would make the current "
                        f"directory the run directory. Pass {key}=PATH, or leave it out for "
                        "outputs/<date>/<time>_<id>.")


def is_run_dir_of_ours(path: Path) -> bool:
    """Does `path` hold only files `gsgd train` writes, at least one of them a run file?"""
    try:
        names = [child.name for child in Path(path).iterdir()]
    except OSError:
        return False
    return all(_own(name) for name in names) and any(name in RUN_FILES for name in names)


def check_dir_arguments(argv: list[str]) -> None:
    """`hydra.run.dir=` / `hydra.sweep.dir=` given on the command line, checked before Hydra
    creates the folder (its own errors would be tracebacks): not empty, not a file, not a path
    too long for the file system, inside a folder this user may write to."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in ("hydra.run.dir", "hydra.sweep.dir"):
            continue
        key = key.lstrip("+~")
        check_configured_dir(value, key)
        path = Path(value).expanduser()
        if "${" in value:
            continue   # composed by Hydra: checked when the job starts
        try:
            too_long = (len(os.fsencode(path.absolute())) >= os.pathconf("/", "PC_PATH_MAX")
                        or any(len(os.fsencode(part)) > os.pathconf("/", "PC_NAME_MAX")
                               for part in path.parts))
        except (OSError, ValueError):
            too_long = False
        if too_long:
            raise UserError(f"{key}={value}: the path is too long for the file system; choose "
                            "a shorter one.")
        existing = path
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if existing == path and not path.is_dir():
            raise UserError(f"{key}={value} exists and is not a directory; choose another "
                            f"{key}.")
        if existing != path and not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{key}={value}: cannot create it, {existing} is not writable; "
                            f"choose a writable {key}.")
