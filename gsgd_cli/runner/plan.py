"""What a job does with its run directory, decided before anything is written: start, resume
(also when the scheduler requeued it) or skip a finished run."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from gsgd_cli.errors import UserError
from gsgd_cli.train import TrainSettings, preemption
from gsgd_cli.train.checkpoint import load as load_checkpoint
from gsgd_cli.train.rundir import RunDirectory, check_resume_config


def plan(directory: RunDirectory, cfg: DictConfig, config: dict[str, Any],
          settings: TrainSettings, multirun: bool) -> tuple[str, dict[str, Any] | None]:
    """What to do with the run directory, decided before anything is written:
    ("new", None) | ("resume", checkpoint state) | ("skip", None). In a data-parallel run
    rank 0 decides and the others take its answer."""
    resume, overwrite = cfg.resume, cfg.get("overwrite", False)
    for key, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise UserError(f"Invalid {key}={value!r}. Must be true or false.")
    where = directory.path
    if resume and overwrite:
        raise UserError("resume=true and overwrite=true contradict each other: resume=true "
                        "continues the run, overwrite=true deletes it. Pass one of them.")
    directory.check()
    if not resume and not overwrite and _requeued(directory):
        # this scheduler job, requeued after a preemption or its time limit: continue it (or
        # start again if it never reached a checkpoint)
        if not directory.checkpoint.is_file():
            print(f"gsgd train: this job was requeued before its first checkpoint; starting "
                  f"{where} again")
            directory.check_new()
            return "new", None
        requeued = resume = True
    else:
        requeued = False
    if not resume:
        if directory.holds_run() and not overwrite:
            raise UserError(f"{where} already holds a run ({', '.join(directory.existing())}). "
                            "Continue it with resume=true, choose another hydra.run.dir, or "
                            "pass overwrite=true to delete its files and start again.")
        directory.check_new()
        return "new", None
    if not directory.checkpoint.is_file():
        if multirun:   # a job of the sweep that never started, or never reached a checkpoint
            directory.check_new()
            return "new", None
        if directory.status == "diverged":
            raise UserError(
                f"{where} diverged before its first checkpoint "
                f"({(directory.summary or {}).get('message', 'see summary.json')}); there is "
                "nothing to resume, and it would diverge again. Start a new run with a smaller "
                "learning rate (another hydra.run.dir, or overwrite=true to replace this one).")
        raise UserError(f"resume=true but there is no checkpoint at {directory.checkpoint}. "
                        "Point hydra.run.dir at the run to continue, or drop resume=true.")
    state = load_checkpoint(directory.checkpoint)
    check_resume_config(directory.checkpoint, state.get("config"), config)
    if requeued:
        print(f"gsgd train: this job was requeued; continuing {where} from its checkpoint at "
              f"iteration {state['iteration']}")
    if directory.status == "diverged":
        return "skip", None   # resuming would diverge again at the same step
    if directory.status == "completed":
        ipe = state["iterations_per_epoch"]
        total = settings.iterations if settings.iterations is not None else settings.epochs * ipe
        if state["iteration"] == total:
            return "skip", None
    return "resume", state


def _requeued(directory: RunDirectory) -> bool:
    """Does `directory` hold a run of this very scheduler job (`preemption.scheduler_job_id`):
    this job was requeued? Its summary says so, or its checkpoint when it was killed before
    writing one."""
    job = preemption.scheduler_job_id()
    if job is None or not directory.holds_run():
        return False
    if directory.summary is not None and "scheduler_job" in directory.summary:
        return directory.summary["scheduler_job"] == job
    if directory.checkpoint.is_file():
        return load_checkpoint(directory.checkpoint).get("scheduler_job") == job
    return False
