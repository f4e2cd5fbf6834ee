"""A run's checkpoint state and its way back: what a checkpoint holds, loading it into a trainer
after checking it fits, the metrics lines a resume keeps, and putting the run's files back when
a resume fails before its first checkpoint."""
from __future__ import annotations

import json
from typing import Any

import torch

from gsgd_cli import safe_files
from gsgd_cli.errors import UserError

from .checkpoint import DiskFullError, load, save_atomic
from .layout import METRICS, SUMMARY
from .rundir import check_resume_config


HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
METRICS_LIMIT = 1 << 30   # bytes of metrics.jsonl read on resume (a line is ~300 bytes)


def rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def checkpoint_state(trainer: Any) -> dict[str, Any]:
    """The checkpoint's contents (a collective in a data-parallel run: every rank's RNG
    states are gathered; rank 0 writes)."""
    rng_ranks = trainer.ranks.gather(rng_states()) if trainer.ranks.distributed else None
    return {
        "iteration": trainer.iteration,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "schedule": {"base_lrs": trainer.base_lrs, "kind": trainer.schedule.kind},
        "perm": trainer.perm,
        "data_rng": trainer.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "running": (trainer.loss_sum, trainer.correct, trainer.seen),
        "best_test_acc": trainer.best_test_acc,
        "best_val_acc": trainer.best_val_acc,
        "last_metrics": trainer.last_metrics,
        "elapsed_s": trainer._elapsed(),
        "batch_size": trainer.settings.batch_size,
        "iterations_per_epoch": trainer.iterations_per_epoch,
        "config": trainer.config,
        "world_size": trainer.ranks.world_size,
        "rng_ranks": rng_ranks,      # [(torch, cuda) per rank] of a data-parallel run
        "scheduler_job": trainer.extra_summary.get("scheduler_job"),   # see preemption.py
        "data_files": trainer.extra_summary.get("data_files"),   # data.fingerprint
    }


def save_checkpoint(trainer: Any) -> None:
    """Write the checkpoint (rank 0), after checking that every rank holds the same model."""
    trainer.ranks.broadcast_buffers(trainer.model)
    differ = trainer.ranks.differing_tensors(trainer.model)
    if differ:
        raise RuntimeError(f"the {trainer.ranks.world_size} processes of this data-parallel run "
                           f"hold different weights ({', '.join(differ[:5])}"
                           f"{', ...' if len(differ) > 5 else ''}) at iteration "
                           f"{trainer.iteration}: their steps were not the same. No checkpoint "
                           "was written; please report this with the command.")
    state = checkpoint_state(trainer)
    if trainer.ranks.writer:
        try:
            save_atomic(state, trainer.checkpoint_path)
        except DiskFullError as exc:
            kept = (f"the previous checkpoint (iteration {trainer.checkpoint_iteration}) is "
                    "intact; free some space, then continue with resume=true"
                    if trainer.checkpoint_iteration is not None else
                    "no checkpoint had been written yet; free some space and start again")
            raise DiskFullError(f"{exc}; {kept}.") from None
    trainer.checkpoint_iteration = trainer.iteration


def restore(trainer: Any, state: dict[str, Any] | None = None) -> None:
    """Load `state` (default: the run directory's checkpoint) into the model, optimizer and
    RNGs after checking it fits this run; writes nothing. `fit(resume=True)` calls it
    unless it was called before."""
    path = trainer.checkpoint_path
    if state is None:
        if not path.is_file():
            raise UserError(f"resume=true but there is no checkpoint at {path}. Point "
                            "hydra.run.dir at the run to continue, or drop resume=true.")
        state = load(path)
    if trainer.config is not None:
        check_resume_config(path, state.get("config"), trainer.config)
    if state["iteration"] > trainer.total:
        raise UserError(f"The checkpoint at {path} is at iteration {state['iteration']}, "
                        f"beyond this budget of {trainer.total} iterations; a run cannot be "
                        "shortened: resume with a budget at least as large.")
    if state["batch_size"] != trainer.settings.batch_size:
        raise UserError(f"The checkpoint at {path} was trained with train.batch_size="
                        f"{state['batch_size']}; resume with the same batch size.")
    world = state.get("world_size", 1)
    if world != trainer.ranks.world_size:
        raise UserError(f"The checkpoint at {path} was written by a run on {world} "
                        f"process{'es' if world > 1 else ''}; resume it on {world} (e.g. "
                        f"torchrun --nproc_per_node={world}"
                        f"{' or plain gsgd train' if world == 1 else ''}): with another "
                        "number the gradients are summed in another order, so the weights "
                        "would not continue bit for bit.")
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"The checkpoint at {path} does not fit this model/optimizer ({first}); "
                        "resume with the same model and optimizer settings as the "
                        "original run.") from None
    perm, n = state["perm"], len(trainer.data.train_y)
    if perm is not None and not (isinstance(perm, torch.Tensor) and perm.shape == (n,)
                                 and torch.equal(perm.sort().values, torch.arange(n))):
        raise UserError(f"The checkpoint at {path} holds a data order that is not a "
                        f"permutation of the {n} training examples; it does not belong to "
                        "this run's data (or is damaged): resume on the original data.")
    trainer.base_lrs = list(state["schedule"]["base_lrs"])
    trainer.iteration = state["iteration"]
    trainer.perm = perm
    trainer.generator.set_state(state["data_rng"])
    torch_rng, cuda_rng = state["torch_rng"], state["cuda_rng"]
    if state.get("rng_ranks") is not None:
        torch_rng, cuda_rng = state["rng_ranks"][trainer.ranks.rank]
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    trainer.loss_sum, trainer.correct, trainer.seen = state["running"]
    trainer.best_test_acc = state["best_test_acc"]
    trainer.best_val_acc = state.get("best_val_acc")
    trainer.last_metrics = state["last_metrics"]
    trainer.elapsed_before = state["elapsed_s"]
    trainer.checkpoint_iteration = trainer.iteration
    trainer._metrics_to_keep = metrics_up_to_checkpoint(trainer) if trainer.ranks.writer else None
    trainer._before = files_before(trainer) if trainer.ranks.writer else None
    trainer.restored = True


def files_before(trainer: Any) -> dict[str, bytes | None]:
    """The run's summary, metrics and .hydra files as they are before a resume writes
    (`put_back`)."""
    out: dict[str, bytes | None] = {}
    for name in (SUMMARY, METRICS, *HYDRA_FILES):
        try:
            out[name] = safe_files.read_bytes(trainer.run_dir / name, METRICS_LIMIT)
        except FileNotFoundError:
            out[name] = None
        except OSError:   # unreadable: leave it to the resume's own checks
            return {}
    return out


def put_back(trainer: Any) -> bool:
    """Restore the files `files_before` read, after a resume failed before writing a
    checkpoint (they then match the checkpoint again); whether that worked."""
    before = getattr(trainer, "_before", None) or {}
    kept = bool(before)
    for name, data in before.items():
        path = trainer.run_dir / name
        try:
            now = safe_files.read_bytes(path, METRICS_LIMIT)
        except FileNotFoundError:
            now = None
        except OSError:
            now = b""
        if now == data:
            continue   # unchanged (a file the size limit would not let us write again)
        try:
            safe_files.remove(path) if data is None else safe_files.write_atomic(path, data)
        except OSError:
            kept = False
    return kept


def metrics_up_to_checkpoint(trainer: Any) -> list[str] | None:
    """The lines of metrics.jsonl to keep on resume: those up to the checkpoint (later
    evaluations will be redone), without a partial last line (the run was killed while
    writing it). Reads only; `fit` writes the result."""
    metrics = trainer.run_dir / METRICS
    if not metrics.exists() and not safe_files.is_link(metrics):
        return None
    try:
        text = safe_files.read_text(metrics, METRICS_LIMIT)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {metrics}: {exc}; move it away (the resumed run then "
                        "logs only its new evaluations) or restore it.") from None
    lines = [line for line in text.splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            iteration = json.loads(line)["iteration"]
            iteration + 0   # a number, not a string or a list
        except (ValueError, TypeError, KeyError, RecursionError):
            if number == len(lines):
                trainer.log(f"gsgd train: dropped the partial last line of {metrics} (the run "
                         "was stopped while writing it).")
                break
            raise UserError(f"{metrics} line {number} is not a metrics record; delete or "
                            "fix that line, then resume again.") from None
        if iteration <= trainer.iteration:
            kept.append(line)
    return kept
