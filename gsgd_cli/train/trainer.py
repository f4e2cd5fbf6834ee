"""The training loop, independent of Hydra: plain objects in, run directory out.

    trainer = Trainer(model, optimizer, data, run_dir, TrainSettings(epochs=3), Schedule())
    summary = trainer.fit()          # or fit(resume=True) to continue from run_dir/checkpoint.pt

Writes into `run_dir`:

* `metrics.jsonl`  one JSON object per evaluation: iteration, epoch, lr, train_loss, train_acc
                   (running means since the previous evaluation), test_loss, test_acc, elapsed_s,
                   and val_loss, val_acc on the held-out split when data.val_size > 0;
* `tb/`            TensorBoard scalars with the same names, step = iteration;
* `checkpoint.pt`  model, optimizer, schedule base rates, RNG states, data order, iteration and
                   the run's composed config (`config`, checked on resume); read back with
                   torch's restricted unpickler;
                   written atomically every `checkpoint_every` iterations and at the end;
* `summary.json`   status (completed | diverged | interrupted), final and best test accuracy,
                   final train loss, wall time and whatever `extra_summary` adds (seed, git
                   commit, torch version, device, ...).

Reproducibility: all data-order and augmentation randomness comes from one CPU generator
seeded with `seed`, and every random state is in the checkpoint, so a resumed run ends with
the same weights as an uninterrupted one (bitwise on the CPU).

Data-parallel training (`ranks`, see `distributed`): every rank runs this loop with the same
generator, takes its share of each global batch of `batch_size` examples and trains the
`DistributedDataParallel` wrapper of the model; losses and accuracies are summed over the ranks
at the sync points, evaluation is split over the ranks (whole evaluation batches, summed), and
every stop (divergence, failed step) is decided by all ranks together. Only rank 0 writes; a
checkpoint first checks that every rank holds the same weights.

Waiting for the device: a training step (`step.TrainStep`) never reads a device value. The
per-iteration loss and accuracy stay on the device (`step.RunningSums`), and the loop
synchronises only at its sync points: evaluation, checkpoints and every `sync_every`
iterations. There it checks every loss since the previous sync point and calls the optimizer's
`check_steps()` (G-SGD, Path-SGD: their steps write nothing once a check failed). A non-finite
loss or a failed step stops the run as `diverged`, naming the iteration where it happened, and
no checkpoint is written after it. `train.cuda_graphs=true` replays the step as a CUDA graph.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli import safe_files

from .checkpoint import DiskFullError, append_text, load, save_atomic, write_text_atomic
from .distributed import SINGLE, Ranks, StopVote
from .preemption import preemption_signal
from .best import BestModel
from .progress import EarlyEstimate, eval_line
from . import tensorboard_log
from gsgd_cli.errors import UserError
from .rundir import check_resume_config, remove_orphaned_tmp
from .signals import Interrupted, StopRequests, signal_name
from .schedule import Schedule
from .step import GraphStep, RunningSums, TrainStep

if TYPE_CHECKING:
    from gsgd_cli.data.pipeline import DeviceData

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TB_DIR = "tb"


def _divergence_errors() -> tuple[type[BaseException], ...]:
    """Exceptions an optimizer raises instead of writing non-finite weights."""
    import importlib

    found = []
    for module, name in (("gsgd_cli.optim.gsgd", "GSGDStepError"),
                         ("gsgd_cli.optim.path_sgd", "PathSGDStepError")):
        try:  # the optimizer modules are optional for the trainer
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
METRICS_LIMIT = 1 << 30   # bytes of metrics.jsonl read on resume (a line is ~300 bytes)
METRIC_KEYS = ("iteration", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
               "elapsed_s")
VAL_KEYS = ("val_loss", "val_acc")   # also logged when data.val_size > 0


@dataclass
class TrainSettings:
    """Budget and bookkeeping. Set `iterations` to budget in iterations, else `epochs` counts."""

    epochs: int | None = 3
    iterations: int | None = None
    batch_size: int = 64
    eval_every: int | None = None  # iterations between evaluations; None = once per epoch
    eval_batch_size: int = 1000
    checkpoint_every: int | None = 1000  # iterations; None or 0 = only at the end
    seed: int = 0
    progress: bool | None = None  # None = show a progress bar only on a terminal
    tensorboard: bool = True
    dtype: torch.dtype = torch.float32
    sync_every: int = 1000   # iterations between device syncs at the latest (1: every iteration)
    cuda_graphs: bool = False    # replay the training step as a CUDA graph (CUDA only)
    keep_best: str | None = None  # keep the model with the best value of this metric (best.py)

    def validate(self) -> None:
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"Invalid train.{name}={value!r}. Must be a positive integer"
                                + (" or null." if allow_none else "."))

        if self.iterations is None and self.epochs is None:
            raise UserError("No training budget: set train.epochs=N or train.iterations=N.")
        positive("iterations", self.iterations, allow_none=True)
        if self.iterations is None:
            positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("eval_every", self.eval_every, allow_none=True)
        positive("eval_batch_size", self.eval_batch_size)
        if self.checkpoint_every not in (None, 0):
            positive("checkpoint_every", self.checkpoint_every)
        positive("sync_every", self.sync_every)


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: "DeviceData",
                 run_dir: str | Path, settings: TrainSettings | None = None,
                 schedule: Schedule | None = None, extra_summary: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None, config: dict[str, Any] | None = None,
                 ranks: Ranks = SINGLE):
        """`config`: the run's composed config as plain containers, recorded in the
        checkpoint; `fit(resume=True)` then refuses a checkpoint whose recorded config differs
        outside `rundir.RESUME_MAY_CHANGE`. `ranks`: this process's place in a data-parallel
        run (default: a single process)."""
        self.model = model
        self.ranks = ranks
        self.optimizer = optimizer
        self.data = data
        self.run_dir = Path(run_dir)
        self.settings = settings or TrainSettings()
        self.settings.validate()
        self.schedule = schedule or Schedule()
        self.extra_summary = dict(extra_summary or {})
        self.config = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        n = len(data.train_y)
        if self.settings.batch_size % ranks.world_size:
            raise UserError(f"Invalid train.batch_size={self.settings.batch_size} for "
                            f"{ranks.world_size} processes: the global batch is split evenly "
                            f"between them, so it must be a multiple of {ranks.world_size}.")
        self.iterations_per_epoch = n // self.settings.batch_size
        if self.iterations_per_epoch < 1:
            raise UserError(f"Invalid train.batch_size={self.settings.batch_size}: larger than "
                            f"the training split ({n} samples). Use a smaller batch size.")
        s = self.settings
        self.total = s.iterations if s.iterations is not None else s.epochs * self.iterations_per_epoch
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(s.seed)
        self.iteration = 0
        self.perm: torch.Tensor | None = None
        self._reset_running()
        self.best_test_acc: float | None = None
        self.best_val_acc: float | None = None
        self.last_metrics: dict[str, Any] | None = None
        self.elapsed_before = 0.0
        self.status = "running"
        self.message = ""
        self.checkpoint_iteration: int | None = None
        self.restored = False
        self.label = ""      # prefix of the progress lines, e.g. "job 3: " in a sweep
        self._say: Callable[[str], None] | None = None   # set by fit() on the writing rank
        self._estimate: EarlyEstimate | None = None
        self._writer = None   # TensorBoard, set by fit() when train.tensorboard
        self.best_model = BestModel(self.settings.keep_best, self.run_dir, data.has_val)
        self._before: dict[str, bytes | None] | None = None   # files a resume may put back

    # -- bookkeeping -------------------------------------------------------------------------
    def _reset_running(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def _rng_states(self) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        return (torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def _state(self) -> dict[str, Any]:
        """The checkpoint's contents (a collective in a data-parallel run: every rank's RNG
        states are gathered; rank 0 writes)."""
        rng_ranks = self.ranks.gather(self._rng_states()) if self.ranks.distributed else None
        return {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"base_lrs": self.base_lrs, "kind": self.schedule.kind},
            "perm": self.perm,
            "data_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "running": (self.loss_sum, self.correct, self.seen),
            "best_test_acc": self.best_test_acc,
            "best_val_acc": self.best_val_acc,
            "last_metrics": self.last_metrics,
            "elapsed_s": self._elapsed(),
            "batch_size": self.settings.batch_size,
            "iterations_per_epoch": self.iterations_per_epoch,
            "config": self.config,
            "world_size": self.ranks.world_size,
            "rng_ranks": rng_ranks,      # [(torch, cuda) per rank] of a data-parallel run
            "scheduler_job": self.extra_summary.get("scheduler_job"),   # see preemption.py
            "data_files": self.extra_summary.get("data_files"),   # data.fingerprint
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0), after checking that every rank holds the same model."""
        self.ranks.broadcast_buffers(self.model)
        differ = self.ranks.differing_tensors(self.model)
        if differ:
            raise RuntimeError(f"the {self.ranks.world_size} processes of this data-parallel run "
                               f"hold different weights ({', '.join(differ[:5])}"
                               f"{', ...' if len(differ) > 5 else ''}) at iteration "
                               f"{self.iteration}: their steps were not the same. No checkpoint "
                               "was written; please report this with the command.")
        state = self._state()
        if self.ranks.writer:
            try:
                save_atomic(state, self.checkpoint_path)
            except DiskFullError as exc:
                kept = (f"the previous checkpoint (iteration {self.checkpoint_iteration}) is "
                        "intact; free some space, then continue with resume=true"
                        if self.checkpoint_iteration is not None else
                        "no checkpoint had been written yet; free some space and start again")
                raise DiskFullError(f"{exc}; {kept}.") from None
        self.checkpoint_iteration = self.iteration

    def _stop_for_signal(self, signum: int) -> None:
        """A stop was asked for (SIGINT/SIGTERM, submitit's preemption signal) at the end of an
        iteration, and all ranks agreed: checkpoint, stop (`agreed`: every rank stops here)."""
        if self.checkpoint_iteration != self.iteration and self._weights_finite():
            self.save_checkpoint()
        stop = Interrupted(signum)
        stop.agreed = True
        raise stop

    def restore(self, state: dict[str, Any] | None = None) -> None:
        """Load `state` (default: the run directory's checkpoint) into the model, optimizer and
        RNGs after checking it fits this run; writes nothing. `fit(resume=True)` calls it
        unless it was called before."""
        path = self.checkpoint_path
        if state is None:
            if not path.is_file():
                raise UserError(f"resume=true but there is no checkpoint at {path}. Point "
                                "hydra.run.dir at the run to continue, or drop resume=true.")
            state = load(path)
        if self.config is not None:
            check_resume_config(path, state.get("config"), self.config)
        if state["iteration"] > self.total:
            raise UserError(f"The checkpoint at {path} is at iteration {state['iteration']}, "
                            f"beyond this budget of {self.total} iterations; a run cannot be "
                            "shortened: resume with a budget at least as large.")
        if state["batch_size"] != self.settings.batch_size:
            raise UserError(f"The checkpoint at {path} was trained with train.batch_size="
                            f"{state['batch_size']}; resume with the same batch size.")
        world = state.get("world_size", 1)
        if world != self.ranks.world_size:
            raise UserError(f"The checkpoint at {path} was written by a run on {world} "
                            f"process{'es' if world > 1 else ''}; resume it on {world} (e.g. "
                            f"torchrun --nproc_per_node={world}"
                            f"{' or plain gsgd train' if world == 1 else ''}): with another "
                            "number the gradients are summed in another order, so the weights "
                            "would not continue bit for bit.")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"The checkpoint at {path} does not fit this model/optimizer ({first}); "
                            "resume with the same model and optimizer settings as the "
                            "original run.") from None
        perm, n = state["perm"], len(self.data.train_y)
        if perm is not None and not (isinstance(perm, torch.Tensor) and perm.shape == (n,)
                                     and torch.equal(perm.sort().values, torch.arange(n))):
            raise UserError(f"The checkpoint at {path} holds a data order that is not a "
                            f"permutation of the {n} training examples; it does not belong to "
                            "this run's data (or is damaged): resume on the original data.")
        self.base_lrs = list(state["schedule"]["base_lrs"])
        self.iteration = state["iteration"]
        self.perm = perm
        self.generator.set_state(state["data_rng"])
        torch_rng, cuda_rng = state["torch_rng"], state["cuda_rng"]
        if state.get("rng_ranks") is not None:
            torch_rng, cuda_rng = state["rng_ranks"][self.ranks.rank]
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.loss_sum, self.correct, self.seen = state["running"]
        self.best_test_acc = state["best_test_acc"]
        self.best_val_acc = state.get("best_val_acc")
        self.last_metrics = state["last_metrics"]
        self.elapsed_before = state["elapsed_s"]
        self.checkpoint_iteration = self.iteration
        self._metrics_to_keep = self._metrics_up_to_checkpoint() if self.ranks.writer else None
        self._before = self._files_before() if self.ranks.writer else None
        self.restored = True

    def _files_before(self) -> dict[str, bytes | None]:
        """The run's summary, metrics and .hydra files as they are before a resume writes
        (`put_back`)."""
        out: dict[str, bytes | None] = {}
        for name in (SUMMARY, METRICS, *HYDRA_FILES):
            try:
                out[name] = safe_files.read_bytes(self.run_dir / name, METRICS_LIMIT)
            except FileNotFoundError:
                out[name] = None
            except OSError:   # unreadable: leave it to the resume's own checks
                return {}
        return out

    def put_back(self) -> bool:
        """Restore the files `_files_before` read, after a resume failed before writing a
        checkpoint (they then match the checkpoint again); whether that worked."""
        before = getattr(self, "_before", None) or {}
        kept = bool(before)
        for name, data in before.items():
            path = self.run_dir / name
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

    def _metrics_up_to_checkpoint(self) -> list[str] | None:
        """The lines of metrics.jsonl to keep on resume: those up to the checkpoint (later
        evaluations will be redone), without a partial last line (the run was killed while
        writing it). Reads only; `fit` writes the result."""
        metrics = self.run_dir / METRICS
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
                    self.log(f"gsgd train: dropped the partial last line of {metrics} (the run "
                             "was stopped while writing it).")
                    break
                raise UserError(f"{metrics} line {number} is not a metrics record; delete or "
                                "fix that line, then resume again.") from None
            if iteration <= self.iteration:
                kept.append(line)
        return kept

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _weights_finite(self) -> bool:
        """Checked before each checkpoint, so that a checkpoint never holds NaN/Inf weights
        (all ranks agree)."""
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        finite = (bool(torch.stack([torch.isfinite(t).all() for t in state]).all())
                  if state else True)
        return not self.ranks.any(not finite)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test") -> tuple[float, float]:
        """Mean cross-entropy and accuracy on the test (or the held-out validation) split.

        In a data-parallel run rank k evaluates the batches k, k + n, ... (with rank 0's
        batch-norm statistics) and the sums are added over the ranks: the batches are those of
        a single process, only the order of the final sum differs."""
        xs, ys = ((self.data.test_x, self.data.test_y) if split == "test"
                  else (self.data.val_x, self.data.val_y))
        ranks = self.ranks
        ranks.broadcast_buffers(self.model)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.data.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.data.device)
        n = len(ys)
        starts = range(0, n, self.settings.eval_batch_size)
        for start in starts[ranks.rank::ranks.world_size]:
            x = self.data.inputs(xs[start:start + self.settings.eval_batch_size],
                                 train=False, dtype=self.settings.dtype)
            y = ys[start:start + self.settings.eval_batch_size]
            out = self.model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
        self.model.train(was_training)
        ranks.sum_(loss_sum)
        ranks.sum_(correct)
        return loss_sum.item() / n, correct.item() / n

    def _record(self, writer) -> None:
        test_loss, test_acc = self.evaluate()
        metrics = {
            "iteration": self.iteration,
            "epoch": round(self.iteration / self.iterations_per_epoch, 4),
            "lr": self.lr(),
            "train_loss": self.loss_sum / self.seen if self.seen else float("nan"),
            "train_acc": self.correct / self.seen if self.seen else float("nan"),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "elapsed_s": round(self._elapsed(), 3),
        }
        if self.data.has_val:
            metrics["val_loss"], metrics["val_acc"] = self.evaluate("val")
            if self.best_val_acc is None or metrics["val_acc"] > self.best_val_acc:
                self.best_val_acc = metrics["val_acc"]
        if self.ranks.writer:
            append_text(self.run_dir / METRICS, json.dumps(metrics) + "\n")
            self.best_model.offer(metrics, self.model)
        if writer is not None:
            for key in METRIC_KEYS[1:] + (VAL_KEYS if self.data.has_val else ()):
                writer.add_scalar(key, metrics[key], self.iteration)
            writer.flush()
        self.last_metrics = metrics
        if self.best_test_acc is None or test_acc > self.best_test_acc:
            self.best_test_acc = test_acc
        if self._say is not None:
            rate = self._estimate.seconds_per_iteration(self.iteration) if self._estimate else None
            self._say(eval_line(metrics, self.total, self.iterations_per_epoch, rate))
        self._reset_running()

    # -- the loop ----------------------------------------------------------------------------
    def _make_step(self) -> TrainStep:
        if not self.settings.cuda_graphs:
            return TrainStep(self.train_model, self.optimizer)
        if self.ranks.distributed:
            raise UserError("train.cuda_graphs=true is for one process; a data-parallel run "
                            "(torchrun, srun) all-reduces the gradients between the processes "
                            "in every step. Drop train.cuda_graphs=true.")
        if self.data.device.type != "cuda":
            raise UserError(f"train.cuda_graphs=true needs a CUDA device (the data and model "
                            f"are on {self.data.device}); set device=cuda or drop it.")
        if self.schedule.kind == "exponential" and self.schedule.unit == "iteration":
            raise UserError("train.cuda_graphs=true captures the learning rate in the graph "
                            "and captures again when it changes; schedule=exponential with "
                            "schedule.unit=iteration changes it every iteration. Use "
                            "schedule.unit=epoch or train.cuda_graphs=false.")
        return GraphStep(self.model, self.optimizer)

    def _sync(self, running: RunningSums, bar, step_error: BaseException | None = None,
              ) -> str | None:
        """A sync point: fold the pending losses into the running sums and check them and the
        optimizer's steps (or take `step_error`, raised by a step of the current iteration).
        Returns why the run diverged, or None."""
        start = self.iteration - running.count       # iterations before the pending ones
        losses, hits = running.take()      # of the global batch: the same on every rank
        bad_loss = next((k for k, v in enumerate(losses) if not math.isfinite(v)), None)
        cause, at = None, None
        if bad_loss is not None:
            cause, at = f"loss={losses[bad_loss]}", start + bad_loss + 1
        check = getattr(self.optimizer, "check_steps", None)
        step_at, step_cause = None, None
        try:
            if step_error is not None:
                raise step_error
            if check is not None:
                check()
        except _divergence_errors() as exc:
            step_at = self._failed_iteration(exc, self.iteration + (step_error is not None))
            step_cause = f"optimizer step failed ({str(exc).splitlines()[0]})"
        first_failure = self.ranks.min_or_none(step_at)    # the first failed step on any rank
        if first_failure is not None and (at is None or first_failure < at):
            at = first_failure
            cause = (step_cause if step_at == first_failure else
                     "optimizer step failed (on another process of this data-parallel run)")
        if cause is not None:
            return self._diverged(cause, at)
        batch = self.settings.batch_size
        for value, correct in zip(losses, hits):
            self.loss_sum += value * batch
            self.correct += correct
        self.seen += batch * len(losses)
        if self._writer is not None and losses:
            ipe = self.iterations_per_epoch   # the rate of 1-based iteration i (param group 0)
            tensorboard_log.write_losses(self._writer, start + 1, losses, lambda i: (
                self.base_lrs[0] * self.schedule.factor(i - 1, ipe)))
        if losses:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        return None

    def _failed_iteration(self, exc: BaseException, current: int) -> int:
        """The iteration of a failed optimizer step: `exc.step` counts the optimizer's step()
        calls, which began at this fit's first iteration (else: the `current` iteration)."""
        step = getattr(exc, "step", None)
        return current if step is None else self._fit_start + step

    def _diverged(self, cause: str, iteration: int) -> str:
        self.status = "diverged"
        self.iteration = iteration - 1           # the last iteration that completed normally
        kept = (f"kept the last good checkpoint {self.checkpoint_path} (iteration "
                f"{self.checkpoint_iteration})" if self.checkpoint_iteration is not None
                else "no checkpoint had been written yet")
        lr = self.base_lrs[0] * self.schedule.factor(iteration - 1, self.iterations_per_epoch)
        self.message = (f"training diverged: {cause} at iteration {iteration} (lr={lr:.4g}); "
                        f"stopped and {kept}. Try a smaller learning rate.")
        return self.message

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the data's device without waiting for it (pinned, asynchronous)."""
        device = self.data.device
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def fit(self, resume: bool = False, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to the budget; `resume=True` continues from `state` (default: the
        checkpoint in the run directory)."""
        s = self.settings
        writes = self.ranks.writer
        if writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_orphaned_tmp(self.run_dir)
        self._t0 = time.perf_counter()
        before = None
        if resume:
            if not self.restored:
                self.restore(state)
            before = self._before
            try:
                if writes:
                    self.best_model.load_previous()
                if self._metrics_to_keep is not None:
                    write_text_atomic("".join(line + "\n" for line in self._metrics_to_keep),
                                      self.run_dir / METRICS)
                if writes:   # until it ends, the summary says the run goes on from the checkpoint
                    self.status = "running"
                    self.message = f"resumed from the checkpoint at iteration {self.iteration}"
                    self.write_summary()
            except Exception as exc:
                exc.run_kept = self.put_back()
                raise
        elif writes:
            safe_files.remove(self.run_dir / METRICS)
        # DistributedDataParallel in a data-parallel run (after restore: its constructor
        # copies rank 0's weights to every rank, which hold the same ones by then anyway)
        self.train_model = self.ranks.wrap(self.model, self.data.device)
        writer = None
        if s.tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            # Readers drop the events with step >= purge_step of earlier files: those after the
            # checkpoint, which will be logged again. The checkpoint's own step stays.
            writer = SummaryWriter(str(self.run_dir / TB_DIR),
                                   purge_step=self.iteration + 1 if resume else None)
            tensorboard_log.write_start(writer, self.config, self.optimizer, self.iteration)
            self._writer = writer
        show = (sys.stderr.isatty() if s.progress is None else s.progress) and writes
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.iteration, disable=not show, leave=True,
                   dynamic_ncols=True, unit="it")
        if writes:   # progress lines on stdout; above the bar when there is one
            prefix = f"gsgd train: {self.label}"
            self._say = ((lambda line: tqdm.write(prefix + line, file=sys.stdout)) if show else
                         (lambda line: print(prefix + line, flush=True)))
        cuda = self.data.device.type == "cuda"
        self._estimate = EarlyEstimate(
            self.iteration, self.total,
            sync=(lambda: torch.cuda.synchronize(self.data.device)) if cuda else (lambda: None))
        data, ipe = self.data, self.iterations_per_epoch
        share = (self.ranks.rank, self.ranks.world_size)
        rows = self.ranks.share(s.batch_size)      # this rank's part of each global batch
        self.model.train()
        perm_device = None
        self._fit_start = self.iteration
        running = RunningSums(min(s.sync_every, self.total), data.device, self.ranks)
        # SIGINT/SIGTERM (and submitit's preemption signal): stop after this iteration with a
        # checkpoint; in a data-parallel run all ranks stop at the same iteration (`StopVote`)
        preempt = preemption_signal()
        stop = StopRequests.install(extra=(preempt,) if preempt is not None else ())
        vote = StopVote(self.ranks)
        try:
            train_step = self._make_step()
            while self.iteration < self.total:
                signum = vote(stop.signum)
                if signum is not None:
                    if self._sync(running, bar):      # pending losses into the checkpoint
                        break
                    self._stop_for_signal(signum)
                position = self.iteration % ipe
                if position == 0 or self.perm is None:
                    self.perm = torch.randperm(len(data.train_y), generator=self.generator)
                    perm_device = None
                if perm_device is None:
                    perm_device = self._to_device(self.perm)
                idx = perm_device[position * s.batch_size:(position + 1) * s.batch_size][rows]
                x = data.inputs(data.train_x[idx], train=True, generator=self.generator,
                                dtype=s.dtype, share=share)
                y = data.train_y[idx]
                factor = self.schedule.factor(self.iteration, ipe)
                for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                    group["lr"] = base * factor
                try:
                    running.add(*train_step(x, y))
                except _divergence_errors() as exc:   # raised by step() itself (strict mode,
                    self._sync(running, bar, exc)     # or an earlier failure seen on the CPU)
                    break
                self.iteration += 1
                bar.update(1)
                estimate = self._estimate.tick(self.iteration)
                if estimate is not None and self._say is not None:
                    self._say(estimate)
                last = self.iteration == self.total
                due = (self.iteration % s.eval_every == 0) if s.eval_every else (self.iteration % ipe == 0)
                checkpoint_due = bool(s.checkpoint_every) and (
                    self.iteration % s.checkpoint_every == 0) or last
                if (due or last or checkpoint_due or running.full) and self._sync(running, bar):
                    break
                if checkpoint_due and not self._weights_finite():
                    self._diverged("optimizer step failed (the step left non-finite weights)",
                                   self.iteration)
                    break
                if due or last:
                    self._record(writer)
                if checkpoint_due:
                    self.save_checkpoint()
            else:
                self.status = "completed"
                if self.last_metrics is None or self.last_metrics["iteration"] != self.iteration:
                    self._record(writer)  # e.g. resumed a finished run without its metrics
        except KeyboardInterrupt as exc:
            self.status = "interrupted"
            self.message = (f"interrupted ({signal_name(exc)}) at iteration {self.iteration}; "
                            f"the checkpoint has iteration {self.checkpoint_iteration}")
            raise
        except Exception as exc:
            self.status = "failed"
            self.message = f"{type(exc).__name__}: {exc}"
            if before is not None and self.checkpoint_iteration == self._fit_start:
                # a resume that failed before its first checkpoint: the run is as it was
                exc.run_kept = self.put_back()
            raise
        finally:
            stop.uninstall()
            vote.close()
            bar.close()
            if writer is not None:
                writer.close()
                self._writer = None
            try:
                if self.status == "failed" and before is not None and (
                        self.checkpoint_iteration == self._fit_start):
                    self.summary = {"status": self.status, "message": self.message}
                else:
                    self.summary = self.write_summary()
            except OSError as exc:   # e.g. the disk is full: keep the exception that stopped us
                self.log(f"gsgd train: could not write {self.run_dir / SUMMARY} ({exc.strerror})")
                self.summary = {"status": self.status, "message": self.message}
        return self.summary

    def write_summary(self) -> dict[str, Any]:
        last = self.last_metrics or {}
        summary = {
            "status": self.status,
            "message": self.message or None,
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": self.best_test_acc,
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "iterations": self.iteration,
            "iterations_per_epoch": self.iterations_per_epoch,
            "epochs": round(self.iteration / self.iterations_per_epoch, 4),
            "wall_time_s": round(self._elapsed(), 3),
            "seed": self.settings.seed,
            "torch_version": torch.__version__,
            "device": str(self.data.device),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }
        if self.data.has_val:
            summary.update(final_val_acc=last.get("val_acc"), best_val_acc=self.best_val_acc,
                           final_val_loss=last.get("val_loss"), val_size=len(self.data.val_y))
        summary.update(self.extra_summary)
        if self.ranks.writer:
            write_text_atomic(json.dumps(summary, indent=2) + "\n", self.run_dir / SUMMARY)
        return summary
