"""The data-parallel session: the process group `main()` starts under torchrun or srun, the
ranks that follow rank 0's jobs, and each job handed from rank 0 to the others."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from gsgd_cli.errors import UserError
from gsgd_cli.train import distributed, preemption
from gsgd_cli.train.distributed import SINGLE, Ranks

from .environment import parallel_jobs
from .job import run
from .settings import check_complete


class Session:
    """The data-parallel process group of this process, when `main()` started one (torchrun,
    srun), and whether a job is under way (its ranks are then inside collectives: a rank that
    fails there leaves without a goodbye, and the launcher stops the others)."""

    ranks: Ranks | None = None
    in_job: bool = False


def main_distributed(ranks: Ranks, app: Callable[[], Any]) -> Any:
    Session.ranks = ranks
    code: Any = 1
    try:
        if not ranks.writer:
            code = follow(ranks)
            return code
        try:
            app()
            code = 0
        except SystemExit as exc:
            code = exc.code if exc.code is not None else 0
            raise
        finally:
            if not Session.in_job:
                ranks.broadcast(("end", code if isinstance(code, int) else 1))
    finally:
        Session.ranks = None
        if not Session.in_job:
            distributed.stop(ranks)


def follow(ranks: Ranks) -> int:
    """A rank other than 0 under torchrun or srun: train each job rank 0 sends (its composed
    config and run directory) with it, until rank 0 says the command is over; its exit code."""
    while True:
        kind, value = ranks.broadcast(None)
        if kind == "end":
            return value
        follow_job(ranks, OmegaConf.create(value["cfg"]), Path(value["run_dir"]),
                    **value["options"])


def follow_job(ranks: Ranks, cfg: DictConfig, run_dir: Path, **options: Any) -> None:
    """One job on a rank other than 0: rank 0 reports errors and results and writes; this rank
    trains and stays silent."""
    Session.in_job = True
    try:
        run(cfg, run_dir, ranks=ranks, **options)
    except UserError:   # every rank raises it at the same point (`Ranks.agree`)
        pass
    except KeyboardInterrupt as exc:
        if not getattr(exc, "agreed", False):   # not a stop all ranks agreed on
            raise
        Session.in_job = False
        preemption.hand_over(exc)   # a submitit job: rank 0 requeues it, nothing to do here
    Session.in_job = False


def job_ranks() -> tuple[Ranks, bool]:
    """This job's ranks, and whether they were started for this job alone (a submitit job
    with several tasks: every task runs the Hydra job, and the process group lives as long
    as the job)."""
    if Session.ranks is not None:
        return Session.ranks, False
    launch = distributed.from_environment()
    if launch is None:
        return SINGLE, False
    if launch.launcher == "submitit":
        return distributed.start(launch), True
    raise UserError(f"this job runs in a process that {launch.launcher} did not start (a "
                    "joblib worker?): a data-parallel run trains one job at a time in all its "
                    "processes; drop hydra/launcher=joblib.")


def job_options(hc: Any, multirun: bool) -> dict[str, Any]:
    return {"multirun": multirun, "choices": dict(hc.runtime.choices),
            "job_num": hc.job.num if multirun else None,
            "parallel": parallel_jobs(hc.launcher) if multirun else 1}


def run_job(cfg: DictConfig, run_dir: Path, ranks: Ranks, per_job: bool,
             **options: Any) -> dict[str, Any]:
    """`run()` on rank 0 (or the only process); under torchrun/srun the job goes to the other
    ranks first."""
    if not ranks.distributed:
        return run(cfg, run_dir, **options)
    check_complete(cfg)   # before the others join: a `???` is rank 0's error alone
    if not per_job:
        job_options = {k: v for k, v in options.items() if k in ("multirun", "choices",
                                                                  "job_num", "parallel")}
        ranks.broadcast(("job", {"cfg": OmegaConf.to_container(cfg, resolve=True),
                                 "run_dir": str(run_dir), "options": job_options}))
    Session.in_job = True
    try:
        summary = run(cfg, run_dir, ranks=ranks, **options)
    except UserError:   # every rank raises it at the same point (`Ranks.agree`)
        Session.in_job = False
        raise
    except KeyboardInterrupt as exc:   # a stop all ranks agreed on ends the job cleanly
        Session.in_job = not getattr(exc, "agreed", False)
        raise
    Session.in_job = False
    return summary
