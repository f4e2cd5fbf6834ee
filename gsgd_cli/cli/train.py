"""`gsgd train`: the Hydra application that runs one training job (or a sweep with `-m`).

The config lives in the top-level `conf/` folder of the repository (root config
`conf/train.yaml`), found relative to this file, which works from a clone and from an editable
install. This module only turns the composed config into plain objects and hands them to
`gsgd_cli.train.Trainer`; mistakes the user can fix (`UserError`) are printed as one line on
stderr with exit code 2 (in a multirun the failing job is reported and the others go on).
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
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

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    cores), so `auto` uses one thread for them and torch's default otherwise.
    """
    if value == "auto":
        if device.type == "cpu" and num_parameters < SMALL_MODEL:
            torch.set_num_threads(1)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Invalid cpu_threads={value!r}. Must be auto or a positive integer.")
    torch.set_num_threads(value)


def settings_from_cfg(cfg: DictConfig, progress: bool | None) -> TrainSettings:
    t = cfg.train
    if cfg.dtype not in DTYPES:
        raise UserError(f"Invalid dtype={cfg.dtype!r}. Must be float32 or float64.")
    return TrainSettings(epochs=t.epochs, iterations=t.iterations, batch_size=t.batch_size,
                         eval_every=t.eval_every, eval_batch_size=t.eval_batch_size,
                         checkpoint_every=t.checkpoint_every, seed=cfg.seed, progress=progress,
                         tensorboard=bool(t.tensorboard), dtype=DTYPES[cfg.dtype])


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


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False,
        choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary dict."""
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
        "optimizer_notes": notes,
    }
    trainer = Trainer(model, optimizer, data, run_dir, settings, schedule, extra_summary=extra)
    return trainer.fit(resume=bool(cfg.resume))


def summary_line(summary: dict[str, Any]) -> str:
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    return (f"gsgd train: {summary['status']} {summary['iterations']} iterations "
            f"({summary['epochs']:g} epochs) in {summary['wall_time_s']:.1f}s: "
            f"test_acc={fmt(summary['final_test_acc'])} (best {fmt(summary['best_test_acc'])}), "
            f"train_loss={fmt(summary['final_train_loss'])}; run dir {summary['run_dir']}")


def _write_failed_summary(run_dir: Path, message: str) -> None:
    path = run_dir / SUMMARY
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(status="failed", message=message, run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir, multirun=multirun, choices=dict(hc.runtime.choices))
    except UserError as exc:
        print(f"gsgd train: error: {exc}", file=sys.stderr)
        _write_failed_summary(run_dir, str(exc))
        if multirun:
            return None
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"gsgd train: interrupted; continue with: gsgd train resume=true "
              f"hydra.run.dir={run_dir} (plus the same overrides)", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        _write_failed_summary(run_dir, f"{type(exc).__name__}: {exc}")
        raise
    if summary["status"] == "diverged":
        print(f"gsgd train: {summary['message']}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
    else:
        print(summary_line(summary))
    return summary.get("final_test_acc")


class MultirunReport(Callback):
    """After a sweep: one line counting the jobs that completed or diverged, naming the others.

    Exit code 1 when a job failed (bad value, crash) or left no summary; a diverged job is a
    result (e.g. too large a learning rate in a sweep), reported but not an error.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p.parent for p in sweep_dir.glob("*/.hydra")), key=lambda p: p.name)
        by_status: dict[str, list[Path]] = {}
        for job in jobs:
            path = job / SUMMARY
            status = json.loads(path.read_text()).get("status") if path.is_file() else "no summary"
            by_status.setdefault(status, []).append(job)
        done = len(by_status.get("completed", []))
        bad = [f"{job} ({status})" for status, dirs in by_status.items()
               if status not in ("completed", "diverged") for job in dirs]
        diverged = by_status.get("diverged", [])
        print(f"gsgd train: {done} of {len(jobs)} jobs completed in {sweep_dir}"
              + (f"; diverged: {', '.join(map(str, diverged))}" if diverged else "")
              + (f"; not completed: {', '.join(bad)}" if bad else ""))
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    main()
