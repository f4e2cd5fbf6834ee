"""The records of a sweep: one file per job, and the end-of-sweep line that counts them."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gsgd_cli import safe_files
from gsgd_cli.train import signals
from gsgd_cli.train.signals import Interrupted, signal_name, wait_for_workers_on_signal

from . import console

JOB_RECORD = ".gsgd_job.{}.json"   # in a sweep dir: one per job of the latest `gsgd train -m`


def say(line: str) -> None:
    """One line on stderr in one write (the jobs of a parallel sweep share stderr)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def record_job(status: str, run_dir: Path, message: str | None, skipped: bool) -> None:
    """One file per sweep job, `<sweep dir>/.gsgd_job.<num>.json`, read by `MultirunReport`."""
    hc = HydraConfig.get()
    folder = Path(hc.runtime.cwd) / hc.sweep.dir   # the cwd may be the job dir (job.chdir)
    record = {"num": hc.job.num, "run_dir": str(run_dir), "status": status,
              "message": message, "skipped": skipped}
    try:
        safe_files.make_dir(folder)
        safe_files.write_atomic(folder / JOB_RECORD.format(hc.job.num), json.dumps(record) + "\n")
    except OSError as exc:   # the end-of-sweep line then counts this job as without a record
        say(f"gsgd train: could not record job {hc.job.num} in {folder}: {exc}")
    print("gsgd train: " + console.jobs_done_line(folder, JOB_RECORD.format("*"), hc.job.num,
                                                  status), flush=True)


class MultirunReport(Callback):
    """After a sweep: one line counting this sweep's jobs that completed or diverged, naming
    the others.

    Every job of the sweep leaves a record `<sweep dir>/.gsgd_job.<num>.json` (those of an
    earlier sweep are deleted when the sweep starts), so job folders of an earlier sweep in the same directory are not counted.
    Exit code 1 when a job failed (bad value, crash), was refused, or left no record; a
    diverged job is a result (e.g. too large a learning rate in a sweep), reported but not an
    error.
    """

    sweep_dir: str | None = None   # of the sweep running in this process, for `main`'s hint

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        MultirunReport.sweep_dir = str(config.hydra.sweep.dir)
        if not str(config.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher"):
            wait_for_workers_on_signal(say)
        for old in Path(config.hydra.sweep.dir).glob(JOB_RECORD.format("*")):
            old.unlink(missing_ok=True)
        console.record_sweep_size(Path(config.hydra.sweep.dir), console.sweep_size(
            config.hydra.overrides.task, config.hydra.sweeper.get("params")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = []
        for path in sweep_dir.glob(JOB_RECORD.format("*")):
            try:
                record = json.loads(safe_files.read_text(path, 1 << 20))
                if not isinstance(record, dict) or not isinstance(record.get("num"), int):
                    raise ValueError(path)
                records.append(record)
            except (OSError, ValueError, RecursionError):
                records.append({"num": -1, "run_dir": str(path), "status": "unreadable record"})
        records.sort(key=lambda r: r["num"])
        done = [r for r in records if r["status"] == "completed"]
        before = sum(bool(r.get("skipped")) for r in done)
        diverged = [r["run_dir"] for r in records if r["status"] == "diverged"]
        bad = [f"{r['run_dir']} ({r['status']})" for r in records
               if r["status"] not in ("completed", "diverged")]
        print(f"gsgd train: {len(done)} of {len(records)} jobs completed in {sweep_dir}"
              + (f" ({before} already before this command)" if before else "")
              + (f"; diverged: {', '.join(diverged)}" if diverged else "")
              + (f"; not completed: {', '.join(bad)}" if bad else ""), flush=True)
        if signals.received.signum is not None:   # stopped by a signal while the workers ran
            signum = signals.received.signum
            say(f"gsgd train: stopped ({signal_name(Interrupted(signum))}); continue the "
                 f"sweep with the same command plus resume=true hydra.sweep.dir={sweep_dir}")
            sys.exit(128 + signum)
        if bad:
            sys.exit(1)
