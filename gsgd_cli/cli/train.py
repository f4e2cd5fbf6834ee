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
"""
from __future__ import annotations

import functools
import json
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

from gsgd_cli.data import describe, load_data
from gsgd_cli.models import build_model
from gsgd_cli.train import SUMMARY, Schedule, Trainer, TrainSettings, UserError
from gsgd_cli.train.checkpoint import load as load_checkpoint
from gsgd_cli.train.rundir import (HYDRA_DIR, RunDirectory, check_resume_config, new_run_id,
                                   restrict_umask)
from gsgd_cli.train import signals
from gsgd_cli.train.signals import (Interrupted, exit_code, raise_on_sigterm, signal_name,
                                    wait_for_workers_on_signal)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
JOB_RECORD = ".gsgd_job.{}.json"   # in a sweep dir: one per job of the latest `gsgd train -m`

# `${gsgd.run_id:}` in conf/train.yaml's run and sweep directories; cached per composed config,
# so a sweep's jobs all see the value of the sweep.
OmegaConf.register_new_resolver("gsgd.run_id", new_run_id, use_cache=True, replace=True)


def resolve_device(name: Any) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda[:N]` must be available."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available on this machine; "
                            "use device=cpu or device=auto.")
        return torch.device(name)
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


def set_cpu_threads(value: Any, device: torch.device, num_parameters: int) -> None:
    """`cpu_threads`: a positive integer, or `auto` = 1 thread for small models on the CPU.

    The MLPs' matrices are tiny: splitting them over threads gains nothing and is 100x slower
    when the cores are busy with other work (measured: 0.6 ms vs 80 ms per step on 2 shared
    cores), so `auto` uses one thread for them and torch's default otherwise, which is
    `OMP_NUM_THREADS` when set: in the jobs of `hydra/launcher=joblib`, joblib sets it to
    cores // n_jobs, so parallel jobs divide the cores between them.
    """
    if value == "auto":
        if device.type == "cpu" and num_parameters < SMALL_MODEL:
            torch.set_num_threads(1)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Invalid cpu_threads={value!r}. Must be auto or a positive integer.")
    torch.set_num_threads(value)


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
                         tensorboard=bool(t.tensorboard), dtype=DTYPES[cfg.dtype],
                         sync_every=t.get("sync_every", 1000),
                         cuda_graphs=_flag("train.cuda_graphs", t.get("cuda_graphs", False)))


def schedule_from_cfg(cfg: DictConfig) -> Schedule:
    s = cfg.schedule
    return Schedule(kind=s.name, unit=s.get("unit", "epoch"),
                    milestones=tuple(s.get("milestones") or ()), gamma=s.get("gamma", 0.1))


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
    ("new", None) | ("resume", checkpoint state) | ("skip", None)."""
    resume, overwrite = cfg.resume, cfg.get("overwrite", False)
    for key, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise UserError(f"Invalid {key}={value!r}. Must be true or false.")
    where = directory.path
    if resume and overwrite:
        raise UserError("resume=true and overwrite=true contradict each other: resume=true "
                        "continues the run, overwrite=true deletes it. Pass one of them.")
    if not resume:
        if directory.holds_run() and not overwrite:
            raise UserError(f"{where} already holds a run ({', '.join(directory.existing())}). "
                            "Continue it with resume=true, choose another hydra.run.dir, or "
                            "pass overwrite=true to delete its files and start again.")
        return "new", None
    if not directory.checkpoint.is_file():
        if multirun:   # a job of the sweep that never started, or never reached a checkpoint
            return "new", None
        raise UserError(f"resume=true but there is no checkpoint at {directory.checkpoint}. "
                        "Point hydra.run.dir at the run to continue, or drop resume=true.")
    state = load_checkpoint(directory.checkpoint)
    check_resume_config(directory.checkpoint, state.get("config"), config)
    if directory.status == "diverged":
        return "skip", None   # resuming would diverge again at the same step
    if directory.status == "completed":
        ipe = state["iterations_per_epoch"]
        total = settings.iterations if settings.iterations is not None else settings.epochs * ipe
        if state["iteration"] == total:
            return "skip", None
    return "resume", state


def _save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`, as Hydra itself would write them."""
    folder = run_dir / HYDRA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.instance().cfg
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        (folder / name).write_text(OmegaConf.to_yaml(node))


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False,
        choices: dict[str, str] | None = None, directory: RunDirectory | None = None,
        on_claim=None) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary dict.

    `on_claim()` runs once the directory is this run's (every check passed, old files
    removed when asked), before training; the CLI writes `.hydra/` there. A run that was
    already finished (`resume=true` on a completed run with the same budget, or on a
    diverged one) is not touched: its summary comes back with `"skipped": True`.
    """
    try:  # `???` values, e.g. the lambdas that experiment=fig8 asks for
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        key = str(exc).splitlines()[0].rsplit("Missing mandatory value: ", 1)[-1]
        raise UserError(f"No value for {key} (it is ???): set it on the command line, e.g. "
                        f"{key}=VALUE (the experiment preset's header says what to use).") from None
    if not isinstance(cfg.seed, int):
        raise UserError(f"Invalid seed={cfg.seed!r}. Must be an integer.")
    device = resolve_device(cfg.device)
    settings = settings_from_cfg(cfg, _progress(cfg, multirun))
    schedule = schedule_from_cfg(cfg)
    settings.validate()
    describe(cfg.data)  # checks data config values before any loading
    directory = directory or RunDirectory(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    action, state = _plan(directory, cfg, config, settings, multirun)
    if action == "skip":
        return {**directory.summary, "skipped": True}
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, device)
    try:
        model = build_model(cfg.model, data.in_shape, data.num_classes)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    model = model.to(device=device, dtype=settings.dtype)
    set_cpu_threads(cfg.cpu_threads, device, sum(p.numel() for p in model.parameters()))
    try:
        make_optimizer = hydra.utils.instantiate(cfg.optimizer)
        kwargs = {}
        if cfg.optimizer.get("input_shape", "absent") is None:   # Path-SGD: kappa; G-SGD: shapes
            kwargs["input_shape"] = tuple(data.in_shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = make_optimizer(model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"optimizer: {exc}") from None
    notes = [str(w.message) for w in caught]
    for note in notes:   # what the optimizer says about the model: one line each, on stdout
        print(f"gsgd train: note: {note}")
    extra = {
        "git_commit": _git_commit(),
        "config": {k: v for k, v in (choices or {}).items()
                   if v is not None and not k.startswith("hydra/")},
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "run_dir": str(run_dir),
        "cpu_threads": torch.get_num_threads(),
        "optimizer_notes": notes,
    }
    trainer = Trainer(model, optimizer, data, run_dir, settings, schedule, extra_summary=extra,
                      config=config)
    if action == "resume":
        trainer.restore(state)   # every check of the checkpoint, before anything is written
    directory.claim(remove_old=action == "new")
    if on_claim is not None:
        on_claim()
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
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = {}
    summary.update(status="failed", message=message, run_dir=str(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
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
    folder.mkdir(parents=True, exist_ok=True)
    record = {"num": hc.job.num, "run_dir": str(run_dir), "status": status,
              "message": message, "skipped": skipped}
    (folder / JOB_RECORD.format(hc.job.num)).write_text(json.dumps(record) + "\n")


def main() -> Any:
    """`gsgd train`: the Hydra application below, with `o-w` added to the umask first (before
    Hydra creates any directory), so nothing it writes is world-writable, and SIGTERM handled
    like Ctrl-C."""
    restrict_umask()
    previous = raise_on_sigterm()
    try:
        return train_app()
    except KeyboardInterrupt as exc:   # outside a job, e.g. a sweep waiting for its workers
        hint = (f"; continue the sweep with the same command plus resume=true "
                f"hydra.sweep.dir={MultirunReport.sweep_dir}" if MultirunReport.sweep_dir else "")
        _say(f"gsgd train: interrupted ({signal_name(exc)}){hint}")
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

    try:
        summary = run(cfg, run_dir, multirun=multirun, choices=dict(hc.runtime.choices),
                      directory=directory, on_claim=lambda: _save_hydra_files(run_dir, cfg))
        status, message = summary["status"], summary.get("message")
        skipped = bool(summary.get("skipped"))
    except UserError as exc:
        message = str(exc)
        _say(f"gsgd train: error: {exc}")
        if ours():
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
        if ours():
            _write_failed_summary(run_dir, message)
        if not multirun:
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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = []
        for path in sweep_dir.glob(JOB_RECORD.format("*")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
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
