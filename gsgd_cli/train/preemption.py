"""Preemptible cluster runs: a job stopped by its scheduler continues where it stopped.

Hydra's submitit launcher (`hydra/launcher=submitit_slurm`, or `submitit_local` on one machine)
runs every job under submitit, which asks for a signal before the time limit and on preemption
(SIGUSR2 by default, `$SUBMITIT_PREEMPT_SIGNAL`). On that signal submitit's handler asks the
launcher for a resubmission (Hydra's launcher resubmits the same job) and requeues the job.
gsgd steps in before it: the trainer takes the signal as a stop request (`preemption_signal()`,
stop at the end of the iteration with a checkpoint, agreed by all ranks), then hands the signal
back to submitit's handler (`hand_over()`), which requeues.

The requeued job starts the same command again. It finds its run directory holding a run of
the same scheduler job (`scheduler_job_id()`, recorded in the summary and the checkpoint) and
continues it as `resume=true` would (a preempted job that never reached its first checkpoint
starts again). On the CPU it ends with the weights of an uninterrupted job, bit for bit.

A plain SLURM job that SLURM itself requeues (a preemption with `--requeue`, SIGTERM first)
keeps its job id too, so it continues the same way.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Mapping


def preemption_signal(environ: Mapping[str, str] | None = None) -> int | None:
    """The signal submitit sends before a time limit or a preemption, in a submitit job."""
    env = os.environ if environ is None else environ
    if not env.get("SUBMITIT_EXECUTOR"):
        return None
    name = "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    found = getattr(signal, name, None)
    return int(found) if found is not None else None


def scheduler_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """This job's id at its scheduler, the same after a requeue: submitit's job id in a
    submitit job (`local:` + the controller's pid with submitit_local), SLURM's job id (array
    job and task) in a SLURM job; None outside a scheduler."""
    env = os.environ if environ is None else environ
    executor = env.get("SUBMITIT_EXECUTOR")
    if executor == "local" and env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    return None


def is_preemption(exc: BaseException) -> bool:
    """Was this stop (`signals.Interrupted`) caused by submitit's preemption signal?"""
    signum = getattr(exc, "signum", None)
    return signum is not None and signum == preemption_signal()


def hand_over(exc: BaseException) -> None:
    """After a stop by submitit's signal (the checkpoint is written): run submitit's handler,
    which requeues the job and exits (on rank 0; on the other ranks it does nothing)."""
    if not is_preemption(exc):
        return
    handler: Any = signal.getsignal(exc.signum)
    if callable(handler):
        handler(exc.signum, None)
