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

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from gsgd_cli import safe_files
from gsgd_cli.errors import UserError

from . import divergence, evaluation, sync_point, tensorboard_log
from . import resume as run_state
from . import summary as run_summary
from .best import BestModel
from .checkpoint import write_text_atomic
from .distributed import SINGLE, Ranks, StopVote
from .layout import CHECKPOINT, METRIC_KEYS, METRICS, SUMMARY, TB_DIR
from .preemption import preemption_signal
from .progress import EarlyEstimate
from .rundir import remove_orphaned_tmp
from .schedule import Schedule
from .settings import TrainSettings
from .signals import Interrupted, StopRequests, signal_name
from .step import RunningSums, TrainStep, make_step

if TYPE_CHECKING:
    from gsgd_cli.data.pipeline import DeviceData

__all__ = ["CHECKPOINT", "METRICS", "METRIC_KEYS", "SUMMARY", "TB_DIR", "Trainer", "TrainSettings"]


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

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0), after checking every rank holds the same model."""
        run_state.save_checkpoint(self)

    def _stop_for_signal(self, signum: int) -> None:
        """A stop was asked for (SIGINT/SIGTERM, submitit's preemption signal) at the end of an
        iteration, and all ranks agreed: checkpoint, stop (`agreed`: every rank stops here)."""
        if self.checkpoint_iteration != self.iteration and self._weights_finite():
            self.save_checkpoint()
        stop = Interrupted(signum)
        stop.agreed = True
        raise stop

    def restore(self, state: dict[str, Any] | None = None) -> None:
        """Load `state` (default: the run directory's checkpoint) after checking it fits this
        run (`resume.restore`); writes nothing. `fit(resume=True)` calls it unless done before."""
        run_state.restore(self, state)



    def put_back(self) -> bool:
        """Put back the files a resume found, after it failed before its first checkpoint."""
        return run_state.put_back(self)



    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _weights_finite(self) -> bool:
        return divergence.weights_finite(self)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, split: str = "test") -> tuple[float, float]:
        """Mean cross-entropy and accuracy on the test (or the validation) split."""
        return evaluation.evaluate(self, split)

    def _record(self, writer) -> None:
        evaluation.record(self, writer)

    # -- the loop ----------------------------------------------------------------------------
    def _make_step(self) -> TrainStep:
        return make_step(self)

    def _sync(self, running: RunningSums, bar, step_error: BaseException | None = None,
              ) -> str | None:
        """A sync point (`sync_point.sync`); returns why the run diverged, or None."""
        return sync_point.sync(self, running, bar, step_error)

    def _failed_iteration(self, exc: BaseException, current: int) -> int:
        return divergence.failed_iteration(self, exc, current)

    def _diverged(self, cause: str, iteration: int) -> str:
        return divergence.diverged(self, cause, iteration)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the data's device without waiting for it (pinned, asynchronous)."""
        device = self.data.device
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def fit(self, resume: bool = False, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to the budget; `resume=True` continues from `state` (default: the
        checkpoint in the run directory)."""
        before = self._begin(resume, state)
        # DistributedDataParallel in a data-parallel run (after restore: its constructor
        # copies rank 0's weights to every rank, which hold the same ones by then anyway)
        self.train_model = self.ranks.wrap(self.model, self.data.device)
        writer = self._open_tensorboard(resume)
        bar = self._open_progress()
        self.model.train()
        self._perm_device = None
        self._fit_start = self.iteration
        running = RunningSums(min(self.settings.sync_every, self.total), self.data.device,
                              self.ranks)
        # SIGINT/SIGTERM (and submitit's preemption signal): stop after this iteration with a
        # checkpoint; in a data-parallel run all ranks stop at the same iteration (`StopVote`)
        preempt = preemption_signal()
        stop = StopRequests.install(extra=(preempt,) if preempt is not None else ())
        vote = StopVote(self.ranks)
        try:
            self._train(running, bar, writer, stop, vote)
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
            self._finish(before, writer)
        return self.summary

    def _begin(self, resume: bool, state: dict[str, Any] | None) -> dict | None:
        """The run directory made ready: a resume restored (its metrics cut back to the
        checkpoint, its summary saying it goes on), a new run's old metrics removed. Returns
        the files a failed resume puts back (None for a new run)."""
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
        return before

    def _open_tensorboard(self, resume: bool):
        """The TensorBoard writer on the writing rank when train.tensorboard, else None."""
        if not (self.settings.tensorboard and self.ranks.writer):
            return None
        from torch.utils.tensorboard import SummaryWriter

        # Readers drop the events with step >= purge_step of earlier files: those after the
        # checkpoint, which will be logged again. The checkpoint's own step stays.
        writer = SummaryWriter(str(self.run_dir / TB_DIR),
                               purge_step=self.iteration + 1 if resume else None)
        tensorboard_log.write_start(writer, self.config, self.optimizer, self.iteration)
        self._writer = writer
        return writer

    def _open_progress(self):
        """The progress bar (shown on a terminal or when asked), the progress lines and the
        early estimate of the run's duration."""
        s, writes = self.settings, self.ranks.writer
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
        return bar

    def _train(self, running: RunningSums, bar, writer, stop: StopRequests,
               vote: StopVote) -> None:
        """The loop: one step per iteration until the budget is spent, a stop is asked for or
        the run diverges; sets the status to completed when the budget is spent."""
        rows = self.ranks.share(self.settings.batch_size)   # this rank's part of a global batch
        train_step = self._make_step()
        while self.iteration < self.total:
            signum = vote(stop.signum)
            if signum is not None:
                if self._sync(running, bar):      # pending losses into the checkpoint
                    break
                self._stop_for_signal(signum)
            x, y = self._next_batch(rows)
            factor = self.schedule.factor(self.iteration, self.iterations_per_epoch)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            try:
                running.add(*train_step(x, y))
            except divergence.divergence_errors() as exc:   # raised by step() itself (strict
                self._sync(running, bar, exc)   # mode, or an earlier failure seen on the CPU)
                break
            self.iteration += 1
            bar.update(1)
            estimate = self._estimate.tick(self.iteration)
            if estimate is not None and self._say is not None:
                self._say(estimate)
            if self._after_step(running, bar, writer):
                break
        else:
            self.status = "completed"
            if self.last_metrics is None or self.last_metrics["iteration"] != self.iteration:
                self._record(writer)  # e.g. resumed a finished run without its metrics

    def _next_batch(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's inputs and labels of the current iteration's batch (a new data order at
        the start of each epoch)."""
        s, data = self.settings, self.data
        position = self.iteration % self.iterations_per_epoch
        if position == 0 or self.perm is None:
            self.perm = torch.randperm(len(data.train_y), generator=self.generator)
            self._perm_device = None
        if self._perm_device is None:
            self._perm_device = self._to_device(self.perm)
        idx = self._perm_device[position * s.batch_size:(position + 1) * s.batch_size][rows]
        x = data.inputs(data.train_x[idx], train=True, generator=self.generator,
                        dtype=s.dtype, share=(self.ranks.rank, self.ranks.world_size))
        return x, data.train_y[idx]

    def _after_step(self, running: RunningSums, bar, writer) -> bool:
        """Sync, evaluate and checkpoint when due; whether the run stops (it diverged)."""
        s = self.settings
        last = self.iteration == self.total
        due = ((self.iteration % s.eval_every == 0) if s.eval_every
               else (self.iteration % self.iterations_per_epoch == 0))
        checkpoint_due = bool(s.checkpoint_every) and (
            self.iteration % s.checkpoint_every == 0) or last
        if (due or last or checkpoint_due or running.full) and self._sync(running, bar):
            return True
        if checkpoint_due and not self._weights_finite():
            self._diverged("optimizer step failed (the step left non-finite weights)",
                           self.iteration)
            return True
        if due or last:
            self._record(writer)
        if checkpoint_due:
            self.save_checkpoint()
        return False

    def _finish(self, before: dict | None, writer) -> None:
        """Close TensorBoard and write the summary (not after a resume that failed before its
        first checkpoint: the run's files are as they were)."""
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

    def write_summary(self) -> dict[str, Any]:
        return run_summary.write_summary(self)

