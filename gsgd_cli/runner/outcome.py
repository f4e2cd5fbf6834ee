"""One job on rank 0 (or the only process), holding its run directory's lock: run it and turn
what happened (a result, a user error, Ctrl-C or SIGTERM, a crash) into its lines, its exit
code, its failed summary and its sweep record."""
from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gsgd_cli import safe_files
from gsgd_cli.errors import UserError
from gsgd_cli.train import preemption, runlock, signals
from gsgd_cli.train.distributed import Ranks
from gsgd_cli.train.rundir import RunDirectory, check_configured_dir, is_run_dir_of_ours
from gsgd_cli.train.signals import Interrupted, exit_code, signal_name

from . import console
from .files import save_hydra_files, summary_line, write_failed_summary
from .session import Session, job_options, run_job
from .sweep import record_job, say


def train_job(cfg: DictConfig, hc: Any, multirun: bool, run_dir: Path, ranks: Ranks,
               per_job: bool) -> float | None:
    """One job on rank 0 (or the only process), holding the run directory's lock
    (`runlock`: one command per run directory at a time)."""
    try:
        check_configured_dir(hc.sweep.dir if multirun else hc.run.dir,
                             "hydra.sweep.dir" if multirun else "hydra.run.dir")
        held = runlock.lock(run_dir)
    except (UserError, OSError) as exc:
        if type(exc) is not UserError and not isinstance(exc, safe_files.UnsafeFileError):
            exc = UserError(f"cannot write into the run directory {run_dir} "
                            f"({exc.strerror or exc}); choose a writable hydra.run.dir.")
        say(f"gsgd train: error: {exc}")
        if multirun:
            record_job("refused", run_dir, str(exc), False)
            return None
        sys.exit(2)
    try:
        return _train_locked(cfg, hc, multirun, run_dir, ranks, per_job)
    finally:   # a folder refused as not a run directory keeps no lock file of ours
        held.release(remove_file=not is_run_dir_of_ours(run_dir))


def _train_locked(cfg: DictConfig, hc: Any, multirun: bool, run_dir: Path, ranks: Ranks,
                  per_job: bool) -> float | None:
    """One job on rank 0 (or the only process): run it, report it, record it in the sweep."""
    directory = RunDirectory(run_dir)
    status, message, skipped = "failed", None, False
    in_worker = multirun and not str(hc.launcher.get("_target_", "")).endswith(".BasicLauncher")
    # `signals.received`, not a name imported from it: joblib ships this function by value
    # (Hydra hands over the undecorated one), which would copy a module-level object per job.
    if in_worker and signals.received.signum is not None:   # this worker was told to stop
        stopped_by = signal_name(Interrupted(signals.received.signum))
        message = f"not started: the sweep was stopped ({stopped_by})"
        record_job("interrupted", run_dir, message, skipped)
        return None

    def ours() -> bool:
        """May this command write a failed summary here (never into another run's files)?"""
        return directory.claimed or not directory.holds_run()

    print("gsgd train: " + (f"job {hc.job.num}: " if multirun else "")
          + console.overrides_line(hc.overrides.task), flush=True)
    try:
        summary = run_job(cfg, run_dir, ranks, per_job, directory=directory,
                           on_claim=lambda: save_hydra_files(run_dir, cfg),
                           **job_options(hc, multirun))
        status, message = summary["status"], summary.get("message")
        skipped = bool(summary.get("skipped"))
    except (UserError, safe_files.UnsafeFileError) as exc:
        message = str(exc)
        say(f"gsgd train: error: {exc}")
        if getattr(exc, "run_kept", False):   # a resume that failed put the run back as it was
            pass
        elif ours():
            write_failed_summary(run_dir, message)
            if not directory.claimed:
                save_hydra_files(run_dir, cfg)
        else:
            status = "refused"
        if multirun:
            record_job(status, run_dir, message, skipped)
            return None
        sys.exit(2)
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (signals.Interrupted)
        status = "interrupted"
        if preemption.is_preemption(exc):
            record_job(status, run_dir, message, skipped)
            stopped = (RunDirectory(run_dir).summary or {}).get("message") or "stopped"
            say(f"gsgd train: {signal_name(exc)} from the scheduler in job {run_dir}: "
                 f"{stopped}; submitit requeues the job, which then continues the run")
            preemption.hand_over(exc)   # submitit's handler: resubmits, requeues, exits
        if multirun:
            record_job(status, run_dir, message, skipped)
            say(f"gsgd train: interrupted ({signal_name(exc)}) in job {run_dir}; continue the "
                 f"sweep with the same command plus resume=true hydra.sweep.dir="
                 f"{hc.sweep.dir}")
            if in_worker:   # exiting would make the launcher kill the other workers at once
                signals.received.signum = (signals.received.signum
                                           or getattr(exc, "signum", signal.SIGINT))
                return None
        elif directory.checkpoint.is_file():
            say(f"gsgd train: interrupted ({signal_name(exc)}); continue with: gsgd train "
                 f"resume=true hydra.run.dir={run_dir} (plus the same overrides)")
        else:
            say(f"gsgd train: interrupted ({signal_name(exc)}) before a checkpoint was "
                 f"written in {run_dir}; there is nothing to resume: run the command again")
        sys.exit(exit_code(exc))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if ours() and not getattr(exc, "run_kept", False):
            write_failed_summary(run_dir, message)
        if not multirun:
            raise
        if Session.in_job:   # the other ranks are inside the job: stop here (and them)
            raise
        # A crash in one job must not hide the end-of-sweep line: report it and go on.
        traceback.print_exc()
        say(f"gsgd train: job {run_dir} crashed: {message.splitlines()[0]}")
        record_job(status, run_dir, message, skipped)
        return None
    if multirun:
        record_job(status, run_dir, message, skipped)
    if status == "diverged":
        say(f"gsgd train: {message}" + (" (already diverged before; nothing to do)"
                                          if skipped else ""))
        if not multirun:
            sys.exit(1)
    else:
        print(summary_line(summary))
    return summary.get("final_test_acc")
