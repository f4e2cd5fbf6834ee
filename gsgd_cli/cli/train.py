"""`gsgd train`: the Hydra application that runs one training job (or a sweep with `-m`).

The config lives in the top-level `conf/` folder of the repository (root config
`conf/train.yaml`), found relative to this file, which works from a clone and from an editable
install. This module is the entry only: the job itself is `gsgd_cli.runner` (settings, environment,
plan, job, session, sweep records, outcome), which hands plain objects to
`gsgd_cli.train.Trainer`; mistakes the user can fix (`UserError`) are printed as one line on
stderr with exit code 2 (in a multirun the failing job is reported and the others go on).

A run directory belongs to one run (`gsgd_cli.train.rundir`): a new run refuses a directory
holding another run unless `overwrite=true`, `resume=true` refuses settings that differ from the
checkpoint's, and nothing is written into the directory (`.hydra/` included, which is why
Hydra's own `.hydra/` writing is off) until every check has passed.

Data-parallel runs (`gsgd_cli.train.distributed`): under `torchrun` or `srun`, `main()` starts
the process group; rank 0 runs the Hydra application (one run or a sweep, its directories and
all its output) and sends every job's composed config and run directory to the other ranks,
which train it with rank 0 and write nothing (`follow()`). In a submitit job with several tasks
every task runs the Hydra job; the ranks other than 0 again take the job from rank 0.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gsgd_cli.errors import UserError
from gsgd_cli.runner.conf import CONF_DIR
from gsgd_cli.runner.outcome import train_job
from gsgd_cli.runner.session import Session, follow_job, job_options, job_ranks, main_distributed
from gsgd_cli.runner.sweep import MultirunReport, record_job, say
from gsgd_cli.train import distributed
from gsgd_cli.train.rundir import check_dir_arguments, new_run_id, restrict_umask
from gsgd_cli.train.signals import exit_code, raise_on_sigterm, signal_name

__all__ = ["MultirunReport", "main", "train_app"]   # conf/train.yaml names this MultirunReport

# `${gsgd.run_id:}` in conf/train.yaml's run and sweep directories; cached per composed config,
# so a sweep's jobs all see the value of the sweep.
OmegaConf.register_new_resolver("gsgd.run_id", new_run_id, use_cache=True, replace=True)


def main() -> Any:
    """`gsgd train`: the Hydra application below, with `o-w` added to the umask first (before
    Hydra creates any directory), so nothing it writes is world-writable, and SIGTERM handled
    like Ctrl-C. Under torchrun or srun: rank 0 runs the application, the other ranks
    `follow()` it."""
    restrict_umask()
    previous = raise_on_sigterm()
    try:
        try:
            check_dir_arguments(sys.argv[1:])   # before Hydra creates the folder
            launch = distributed.from_environment()
            if launch is None or launch.launcher == "submitit":   # submitit: see `job_ranks`
                return train_app()
            ranks = distributed.start(launch)
        except UserError as exc:
            say(f"gsgd train: error: {exc}")
            sys.exit(2)
        return main_distributed(ranks, train_app)
    except KeyboardInterrupt as exc:   # outside a job, e.g. a sweep waiting for its workers
        hint = (f"; continue the sweep with the same command plus resume=true "
                f"hydra.sweep.dir={MultirunReport.sweep_dir}" if MultirunReport.sweep_dir else "")
        say(f"gsgd train: interrupted ({signal_name(exc)}){hint}")
        sys.exit(exit_code(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    restrict_umask()   # again: a job may run in another process (joblib, submitit)
    raise_on_sigterm()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        ranks, per_job = job_ranks()
    except UserError as exc:
        say(f"gsgd train: error: {exc}")
        if multirun:
            record_job("failed", run_dir, str(exc), False)
            return None
        sys.exit(2)
    if per_job:   # a submitit job with several tasks: the group lives as long as the job
        try:
            if not ranks.writer:
                follow_job(ranks, cfg, run_dir, **job_options(hc, multirun))
                return None
            return train_job(cfg, hc, multirun, run_dir, ranks, per_job)
        finally:
            if not Session.in_job:
                distributed.stop(ranks)
    return train_job(cfg, hc, multirun, run_dir, ranks, per_job)


if __name__ == "__main__":
    main()
