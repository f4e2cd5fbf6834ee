"""`gsgd train`: the Hydra application that runs one training job (or a sweep with `-m`).

The config lives in the top-level `conf/` folder of the repository (root config
`conf/train.yaml`), found relative to this file, which works from a clone and from an editable
install. This module only turns the composed config into plain objects and hands them to
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

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from gsgd_cli import safe_files
from gsgd_cli.cli import console
from gsgd_cli.cli.conf import CONF_DIR
from gsgd_cli.data import describe, fingerprint, load_data
from gsgd_cli.models import build_model
from gsgd_cli.train import SUMMARY, Schedule, Trainer, TrainSettings, UserError, distributed
from gsgd_cli.train.checkpoint import load as load_checkpoint, raise_disk_full
from gsgd_cli.train.distributed import SINGLE, Ranks
from gsgd_cli.train.rundir import (HYDRA_DIR, RunDirectory, check_configured_dir,
                                   check_dir_arguments, check_resume_config, is_run_dir_of_ours,
                                   new_run_id, restrict_umask)
from gsgd_cli.train import preemption, runlock, signals
from gsgd_cli.train.signals import (Interrupted, exit_code, raise_on_sigterm, signal_name,
                                    wait_for_workers_on_signal)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
JOB_RECORD = ".gsgd_job.{}.json"   # in a sweep dir: one per job of the latest `gsgd train -m`

# `${gsgd.run_id:}` in conf/train.yaml's run and sweep directories; cached per composed config,
# so a sweep's jobs all see the value of the sweep.
OmegaConf.register_new_resolver("gsgd.run_id", new_run_id, use_cache=True, replace=True)


def resolve_device(name: Any, *, ranks: Ranks = SINGLE, job_num: int | None = None,
                   gpus: int | None = None) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda[:N]` must be available.

    Which GPU `auto` and `cuda` take when there are `gpus` of them (default: as many as torch
    sees): in a data-parallel run the one of the process's local rank (`local_rank mod gpus`),
    in job `job_num` of a sweep GPU `job_num mod gpus` (a joblib sweep on a node with several
    GPUs spreads its jobs over them), else the current one. `cuda:N` is that GPU, refused in a
    data-parallel run with several processes per node (they would share it)."""
    name = str(name)
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        name = "cuda" if gpus > 0 else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if gpus == 0:
            raise UserError(f"device={name} but CUDA is not available on this machine; "
                            "use device=cpu or device=auto.")
        if name != "cuda":
            if ranks.distributed and ranks.local_world_size > 1:
                raise UserError(f"device={name} would put all {ranks.local_world_size} processes "
                                "of this node on one GPU; use device=cuda or device=auto (each "
                                "process takes the GPU of its local rank).")
            return torch.device(name)
        if ranks.distributed:
            return torch.device("cuda", ranks.local_rank % gpus)
        if job_num is not None:
            return torch.device("cuda", job_num % gpus)
        return torch.device("cuda")
    raise UserError(f"Invalid device={name!r}. Must be auto, cpu, cuda or cuda:N.")


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD of the checkout this code was loaded from, with "-dirty" when tracked files had
    uncommitted changes. Read once per process: the jobs of a multirun share the code that
    was imported when the sweep started, even if the checkout moves on meanwhile."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


SMALL_MODEL = 1_000_000  # parameters; below this, intra-op threads only cost time on the CPU


def auto_threads(device: torch.device, num_parameters: int, *, parallel: int = 1,
                 cores: int | None = None, environ: Any = None) -> int | None:
    """The number of threads `cpu_threads=auto` sets (None: leave torch's default).

    1 for small models on the CPU; with `parallel` processes training at once on this node
    (the ranks of a data-parallel run on it, the jobs of a joblib sweep) each gets
    `cores // parallel` (at least 1), unless `OMP_NUM_THREADS` says otherwise (the launcher's
    or the user's choice: joblib sets it to cores // n_jobs in its workers, torchrun to 1)."""
    env = os.environ if environ is None else environ
    if device.type == "cpu" and num_parameters < SMALL_MODEL:
        return 1
    if parallel > 1 and not env.get("OMP_NUM_THREADS"):
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        return max(1, cores // parallel)
    return None


def set_cpu_threads(value: Any, device: torch.device, num_parameters: int,
                    parallel: int = 1) -> None:
    """`cpu_threads`: a positive integer, or `auto` (`auto_threads`).

    The MLPs' matrices are tiny: splitting them over threads gains nothing and is 100x slower
    when the cores are busy with other work (measured: 0.6 ms vs 80 ms per step on 2 shared
    cores), so `auto` uses one thread for them; processes that train at once on one node
    divide the cores between them.
    """
    if value == "auto":
        threads = auto_threads(device, num_parameters, parallel=parallel)
        if threads is not None:
            torch.set_num_threads(threads)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Invalid cpu_threads={value!r}. Must be auto or a positive integer.")
    torch.set_num_threads(value)


def parallel_jobs(launcher: Any) -> int:
    """How many jobs of a sweep run at once on this node: `n_jobs` of the joblib launcher
    (-1: one per core, -2: all but one, ...), else 1."""
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1
    n = launcher.get("n_jobs", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n == 0:
        return 1
    return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of torch's own generator on one rank of a data-parallel run (dropout masks
    differ between ranks; data order and augmentation use the shared data generator)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:8], "little")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"Invalid {name}={value!r}. Must be true or false.")
    return value


def settings_from_cfg(cfg: DictConfig, progress: bool | None) -> TrainSettings:
    t = cfg.train
    if cfg.dtype not in DTYPES:
        raise UserError(f"Invalid dtype={cfg.dtype!r}. Must be float32 or float64.")
    return TrainSettings(epochs=t.epochs, iterations=t.iterations, batch_size=t.batch_size,
                         eval_every=t.eval_every, eval_batch_size=t.eval_batch_size,
                         checkpoint_every=t.checkpoint_every, seed=cfg.seed, progress=progress,
                         tensorboard=_flag("train.tensorboard", t.tensorboard), dtype=DTYPES[cfg.dtype],
                         sync_every=t.get("sync_every", 1000),
                         cuda_graphs=_flag("train.cuda_graphs", t.get("cuda_graphs", False)),
                         keep_best=t.get("keep_best"))


def schedule_from_cfg(cfg: DictConfig) -> Schedule:
    s = cfg.schedule
    milestones = s.get("milestones") or ()
    if isinstance(milestones, (int, float, str)):   # schedule.milestones=80: one milestone
        milestones = [milestones]
    return Schedule(kind=s.name, unit=s.get("unit", "epoch"),
                    milestones=tuple(milestones), gamma=s.get("gamma", 0.1))


def _progress(cfg: DictConfig, multirun: bool) -> bool | None:
    value = cfg.progress
    if value in ("auto", None):
        return False if multirun else None
    if isinstance(value, bool):
        return value
    raise UserError(f"Invalid progress={value!r}. Must be auto, true or false.")


def _plan(directory: RunDirectory, cfg: DictConfig, config: dict[str, Any],
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


def _save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`, as Hydra itself would write them."""
    folder = run_dir / HYDRA_DIR
    safe_files.make_dir(folder)
    hydra_cfg = HydraConfig.instance().cfg
    files = {folder / name: OmegaConf.to_yaml(node)
             for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                                ("overrides.yaml", hydra_cfg.hydra.overrides.task))}
    try:   # all three or none of them
        safe_files.write_all_or_none(files)
    except OSError as exc:
        raise_disk_full(exc, folder)   # one line
        raise


def _check_complete(cfg: DictConfig) -> None:
    """`???` values, e.g. the lambdas that experiment=fig8 asks for, are one line."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        key = str(exc).splitlines()[0].rsplit("Missing mandatory value: ", 1)[-1]
        if getattr(exc, "full_key", None) == "model._target_":
            raise UserError("model=custom needs model._target_: the import path of your "
                            "nn.Module, e.g. model._target_=my_pkg.nets.MyNet") from None
        raise UserError(f"No value for {key} (it is ???): set it on the command line, e.g. "
                        f"{key}=VALUE (the experiment preset's header says what to use).") from None


def _sync_bn(cfg: DictConfig, device: torch.device, ranks: Ranks) -> bool:
    value = (cfg.get("distributed") or {}).get("sync_bn", False)
    if not _flag("distributed.sync_bn", value):
        return False
    if device.type != "cuda":
        raise UserError("distributed.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPUs "
                        f"only; this run is on {device}); drop it to keep per-process batch "
                        "statistics.")
    return ranks.distributed


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False,
        choices: dict[str, str] | None = None, directory: RunDirectory | None = None,
        on_claim=None, ranks: Ranks = SINGLE, job_num: int | None = None,
        parallel: int = 1) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary dict.

    `on_claim()` runs once the directory is this run's (every check passed, old files
    removed when asked), before training; the CLI writes `.hydra/` there. A run that was
    already finished (`resume=true` on a completed run with the same budget, or on a
    diverged one) is not touched: its summary comes back with `"skipped": True`.

    `ranks`: this process's place in a data-parallel run (every rank calls `run` with the same
    `cfg`; rank 0 alone reads and writes `run_dir`). `job_num`: the job's number in a sweep
    (picks its GPU); `parallel`: jobs running at once on this node (divides the CPU threads).
    """
    _check_complete(cfg)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise UserError(f"Invalid seed={cfg.seed!r}. Must be an integer from 0 to 2**63-1.")
    settings = settings_from_cfg(cfg, _progress(cfg, multirun))
    schedule = schedule_from_cfg(cfg)
    settings.validate()
    describe(cfg.data)  # checks data config values before any loading
    config = OmegaConf.to_container(cfg, resolve=True)
    device = ranks.agree(lambda: resolve_device(cfg.device, ranks=ranks, job_num=job_num))
    sync_bn = ranks.agree(lambda: _sync_bn(cfg, device, ranks))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if ranks.writer:
        directory = directory or RunDirectory(run_dir)

    def plan():
        action, state = _plan(directory, cfg, config, settings, multirun)
        return action, state, directory.summary if action == "skip" else None

    action, state, old_summary = ranks.from_writer(plan)
    if action == "skip":
        return {**old_summary, "skipped": True}
    torch.manual_seed(cfg.seed)
    with fingerprint.collect() as data_files:   # what files were read, hashed as read
        if ranks.distributed:   # read on one rank per node, sent to the others
            data = distributed.share_within_node(ranks, lambda: load_data(cfg.data, "cpu"))
            data = data.to(device)
        else:
            data = load_data(cfg.data, device)
    if action == "resume":
        ranks.agree(lambda: fingerprint.check_same(run_dir, state.get("data_files"), data_files)
                    if ranks.writer else None)

    def build():
        try:
            return build_model(cfg.model, data.in_shape, data.num_classes)
        except ValueError as exc:
            raise UserError(f"model: {exc}") from None
        except (RuntimeError, MemoryError, OverflowError) as exc:   # e.g. model.width=10**9
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"model: cannot build it ({first}); is a width or size too "
                            "large?") from None

    model = ranks.agree(build).to(device=device, dtype=settings.dtype)
    set_cpu_threads(cfg.cpu_threads, device, sum(p.numel() for p in model.parameters()),
                    parallel=ranks.local_world_size if ranks.distributed else parallel)

    def make_optimizer():
        try:
            make = hydra.utils.instantiate(cfg.optimizer)
            kwargs = {}
            if cfg.optimizer.get("input_shape", "absent") is None:   # Path-SGD: kappa;
                kwargs["input_shape"] = tuple(data.in_shape)           # G-SGD: shapes
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                built = make(model, **kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"optimizer: {exc}") from None
        return built, [str(w.message) for w in caught]

    optimizer, notes = ranks.agree(make_optimizer)
    if ranks.writer:
        for note in notes:   # what the optimizer says about the model: one line each, on stdout
            print(f"gsgd train: note: {note}")
        for line in console.start_lines(optimizer, choices, cfg):
            print(f"gsgd train: {line}", flush=True)
    if sync_bn:   # after the optimizer, which traces the plain batch-norm layers; same parameters
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ranks.world_size > 1:
        torch.manual_seed(_rank_seed(cfg.seed, ranks.rank))
    extra = {
        "git_commit": _git_commit(),
        "config": {k: v for k, v in (choices or {}).items()
                   if v is not None and not k.startswith("hydra/")},
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "run_dir": str(run_dir),
        "cpu_threads": torch.get_num_threads(),
        "optimizer_notes": notes,
        "world_size": ranks.world_size,
        "distributed_backend": ranks.backend,
        "scheduler_job": preemption.scheduler_job_id(),
        "data_files": data_files or None,   # name: [size, sha256] (also in the checkpoint)
    }
    trainer = ranks.agree(lambda: Trainer(model, optimizer, data, run_dir, settings, schedule,
                                          extra_summary=extra, config=config, ranks=ranks))
    if multirun and job_num is not None:
        trainer.label = f"job {job_num}: "
    if action == "resume":   # every check of the checkpoint, before anything is written
        ranks.agree(lambda: trainer.restore(state))
    if ranks.writer:
        directory.claim(remove_old=action == "new")
        if on_claim is not None:
            try:
                on_claim()
            except Exception as exc:   # a resumed run is still its checkpoint: put it back
                exc.run_kept = action == "resume" and trainer.put_back()
                raise
    return trainer.fit(resume=action == "resume", state=state)


def summary_line(summary: dict[str, Any]) -> str:
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    status = ("already " if summary.get("skipped") else "") + str(summary["status"])
    return (f"gsgd train: {status} {summary['iterations']} iterations "
            f"({summary['epochs']:g} epochs) in {summary['wall_time_s']:.1f}s: "
            f"test_acc={fmt(summary['final_test_acc'])} (best {fmt(summary['best_test_acc'])}), "
            f"train_loss={fmt(summary['final_train_loss'])}; run dir {summary['run_dir']}"
            + ("; nothing to do" if summary.get("skipped") else ""))


def _write_failed_summary(run_dir: Path, message: str) -> None:
    path = run_dir / SUMMARY
    summary = RunDirectory(run_dir).summary or {}
    summary.update(status="failed", message=message, run_dir=str(run_dir))
    try:   # never through a link; a full disk leaves the old file (or none), not an empty one
        safe_files.make_dir(run_dir)
        safe_files.write_atomic(path, json.dumps(summary, indent=2) + "\n")
    except OSError:   # e.g. the disk is full: the error line on stderr says what happened
        pass


def _say(line: str) -> None:
    """One line on stderr in one write (the jobs of a parallel sweep share stderr)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _record_job(status: str, run_dir: Path, message: str | None, skipped: bool) -> None:
    """One file per sweep job, `<sweep dir>/.gsgd_job.<num>.json`, read by `MultirunReport`."""
    hc = HydraConfig.get()
    folder = Path(hc.runtime.cwd) / hc.sweep.dir   # the cwd may be the job dir (job.chdir)
    record = {"num": hc.job.num, "run_dir": str(run_dir), "status": status,
              "message": message, "skipped": skipped}
    try:
        safe_files.make_dir(folder)
        safe_files.write_atomic(folder / JOB_RECORD.format(hc.job.num), json.dumps(record) + "\n")
    except OSError as exc:   # the end-of-sweep line then counts this job as without a record
        _say(f"gsgd train: could not record job {hc.job.num} in {folder}: {exc}")
    print("gsgd train: " + console.jobs_done_line(folder, JOB_RECORD.format("*"), hc.job.num,
                                                  status), flush=True)


class _Session:
    """The data-parallel process group of this process, when `main()` started one (torchrun,
    srun), and whether a job is under way (its ranks are then inside collectives: a rank that
    fails there leaves without a goodbye, and the launcher stops the others)."""

    ranks: Ranks | None = None
    in_job: bool = False


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
            if launch is None or launch.launcher == "submitit":   # submitit: see `_job_ranks`
                return train_app()
            ranks = distributed.start(launch)
        except UserError as exc:
            _say(f"gsgd train: error: {exc}")
            sys.exit(2)
        return _main_distributed(ranks)
    except KeyboardInterrupt as exc:   # outside a job, e.g. a sweep waiting for its workers
        hint = (f"; continue the sweep with the same command plus resume=true "
                f"hydra.sweep.dir={MultirunReport.sweep_dir}" if MultirunReport.sweep_dir else "")
        _say(f"gsgd train: interrupted ({signal_name(exc)}){hint}")
        sys.exit(exit_code(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_distributed(ranks: Ranks) -> Any:
    _Session.ranks = ranks
    code: Any = 1
    try:
        if not ranks.writer:
            code = follow(ranks)
            return code
        try:
            train_app()
            code = 0
        except SystemExit as exc:
            code = exc.code if exc.code is not None else 0
            raise
        finally:
            if not _Session.in_job:
                ranks.broadcast(("end", code if isinstance(code, int) else 1))
    finally:
        _Session.ranks = None
        if not _Session.in_job:
            distributed.stop(ranks)


def follow(ranks: Ranks) -> int:
    """A rank other than 0 under torchrun or srun: train each job rank 0 sends (its composed
    config and run directory) with it, until rank 0 says the command is over; its exit code."""
    while True:
        kind, value = ranks.broadcast(None)
        if kind == "end":
            return value
        _follow_job(ranks, OmegaConf.create(value["cfg"]), Path(value["run_dir"]),
                    **value["options"])


def _follow_job(ranks: Ranks, cfg: DictConfig, run_dir: Path, **options: Any) -> None:
    """One job on a rank other than 0: rank 0 reports errors and results and writes; this rank
    trains and stays silent."""
    _Session.in_job = True
    try:
        run(cfg, run_dir, ranks=ranks, **options)
    except UserError:   # every rank raises it at the same point (`Ranks.agree`)
        pass
    except KeyboardInterrupt as exc:
        if not getattr(exc, "agreed", False):   # not a stop all ranks agreed on
            raise
        _Session.in_job = False
        preemption.hand_over(exc)   # a submitit job: rank 0 requeues it, nothing to do here
    _Session.in_job = False


def _job_ranks() -> tuple[Ranks, bool]:
    """This job's ranks, and whether they were started for this job alone (a submitit job
    with several tasks: every task runs the Hydra job, and the process group lives as long
    as the job)."""
    if _Session.ranks is not None:
        return _Session.ranks, False
    launch = distributed.from_environment()
    if launch is None:
        return SINGLE, False
    if launch.launcher == "submitit":
        return distributed.start(launch), True
    raise UserError(f"this job runs in a process that {launch.launcher} did not start (a "
                    "joblib worker?): a data-parallel run trains one job at a time in all its "
                    "processes; drop hydra/launcher=joblib.")


def _job_options(hc: Any, multirun: bool) -> dict[str, Any]:
    return {"multirun": multirun, "choices": dict(hc.runtime.choices),
            "job_num": hc.job.num if multirun else None,
            "parallel": parallel_jobs(hc.launcher) if multirun else 1}


def _run_job(cfg: DictConfig, run_dir: Path, ranks: Ranks, per_job: bool,
             **options: Any) -> dict[str, Any]:
    """`run()` on rank 0 (or the only process); under torchrun/srun the job goes to the other
    ranks first."""
    if not ranks.distributed:
        return run(cfg, run_dir, **options)
    _check_complete(cfg)   # before the others join: a `???` is rank 0's error alone
    if not per_job:
        job_options = {k: v for k, v in options.items() if k in ("multirun", "choices",
                                                                  "job_num", "parallel")}
        ranks.broadcast(("job", {"cfg": OmegaConf.to_container(cfg, resolve=True),
                                 "run_dir": str(run_dir), "options": job_options}))
    _Session.in_job = True
    try:
        summary = run(cfg, run_dir, ranks=ranks, **options)
    except UserError:   # every rank raises it at the same point (`Ranks.agree`)
        _Session.in_job = False
        raise
    except KeyboardInterrupt as exc:   # a stop all ranks agreed on ends the job cleanly
        _Session.in_job = not getattr(exc, "agreed", False)
        raise
    _Session.in_job = False
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    restrict_umask()   # again: a job may run in another process (joblib, submitit)
    raise_on_sigterm()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        ranks, per_job = _job_ranks()
    except UserError as exc:
        _say(f"gsgd train: error: {exc}")
        if multirun:
            _record_job("failed", run_dir, str(exc), False)
            return None
        sys.exit(2)
    if per_job:   # a submitit job with several tasks: the group lives as long as the job
        try:
            if not ranks.writer:
                _follow_job(ranks, cfg, run_dir, **_job_options(hc, multirun))
                return None
            return _train_job(cfg, hc, multirun, run_dir, ranks, per_job)
        finally:
            if not _Session.in_job:
                distributed.stop(ranks)
    return _train_job(cfg, hc, multirun, run_dir, ranks, per_job)


def _train_job(cfg: DictConfig, hc: Any, multirun: bool, run_dir: Path, ranks: Ranks,
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
        _say(f"gsgd train: error: {exc}")
        if multirun:
            _record_job("refused", run_dir, str(exc), False)
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
        _record_job("interrupted", run_dir, message, skipped)
        return None

    def ours() -> bool:
        """May this command write a failed summary here (never into another run's files)?"""
        return directory.claimed or not directory.holds_run()

    print("gsgd train: " + (f"job {hc.job.num}: " if multirun else "")
          + console.overrides_line(hc.overrides.task), flush=True)
    try:
        summary = _run_job(cfg, run_dir, ranks, per_job, directory=directory,
                           on_claim=lambda: _save_hydra_files(run_dir, cfg),
                           **_job_options(hc, multirun))
        status, message = summary["status"], summary.get("message")
        skipped = bool(summary.get("skipped"))
    except (UserError, safe_files.UnsafeFileError) as exc:
        message = str(exc)
        _say(f"gsgd train: error: {exc}")
        if getattr(exc, "run_kept", False):   # a resume that failed put the run back as it was
            pass
        elif ours():
            _write_failed_summary(run_dir, message)
            if not directory.claimed:
                _save_hydra_files(run_dir, cfg)
        else:
            status = "refused"
        if multirun:
            _record_job(status, run_dir, message, skipped)
            return None
        sys.exit(2)
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (signals.Interrupted)
        status = "interrupted"
        if preemption.is_preemption(exc):
            _record_job(status, run_dir, message, skipped)
            stopped = (RunDirectory(run_dir).summary or {}).get("message") or "stopped"
            _say(f"gsgd train: {signal_name(exc)} from the scheduler in job {run_dir}: "
                 f"{stopped}; submitit requeues the job, which then continues the run")
            preemption.hand_over(exc)   # submitit's handler: resubmits, requeues, exits
        if multirun:
            _record_job(status, run_dir, message, skipped)
            _say(f"gsgd train: interrupted ({signal_name(exc)}) in job {run_dir}; continue the "
                 f"sweep with the same command plus resume=true hydra.sweep.dir="
                 f"{hc.sweep.dir}")
            if in_worker:   # exiting would make the launcher kill the other workers at once
                signals.received.signum = (signals.received.signum
                                           or getattr(exc, "signum", signal.SIGINT))
                return None
        elif directory.checkpoint.is_file():
            _say(f"gsgd train: interrupted ({signal_name(exc)}); continue with: gsgd train "
                 f"resume=true hydra.run.dir={run_dir} (plus the same overrides)")
        else:
            _say(f"gsgd train: interrupted ({signal_name(exc)}) before a checkpoint was "
                 f"written in {run_dir}; there is nothing to resume: run the command again")
        sys.exit(exit_code(exc))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if ours() and not getattr(exc, "run_kept", False):
            _write_failed_summary(run_dir, message)
        if not multirun:
            raise
        if _Session.in_job:   # the other ranks are inside the job: stop here (and them)
            raise
        # A crash in one job must not hide the end-of-sweep line: report it and go on.
        traceback.print_exc()
        _say(f"gsgd train: job {run_dir} crashed: {message.splitlines()[0]}")
        _record_job(status, run_dir, message, skipped)
        return None
    if multirun:
        _record_job(status, run_dir, message, skipped)
    if status == "diverged":
        _say(f"gsgd train: {message}" + (" (already diverged before; nothing to do)"
                                          if skipped else ""))
        if not multirun:
            sys.exit(1)
    else:
        print(summary_line(summary))
    return summary.get("final_test_acc")


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
            wait_for_workers_on_signal(_say)
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
            _say(f"gsgd train: stopped ({signal_name(Interrupted(signum))}); continue the "
                 f"sweep with the same command plus resume=true hydra.sweep.dir={sweep_dir}")
            sys.exit(128 + signum)
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    main()
