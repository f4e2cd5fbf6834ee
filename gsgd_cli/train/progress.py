"""What a run says while it runs: one line per evaluation, and an early estimate of its time.

* `eval_line(metrics, total, rate)`: `epoch 3/10 (iteration 2811/9370): train_loss 0.4810
  train_acc 0.8301 test_loss 0.5012 test_acc 0.8213 lr 0.01 elapsed 4.1s ETA 9.6s`;
* `EarlyEstimate`: times iterations `start + 1 .. start + 1 + n` of a fit (the first one pays
  for tracing and warm-up and is left out) and then gives the measured seconds per iteration
  and the time the rest of the budget will take at that speed.

The trainer prints these to stdout when the progress bar is off (output to a file or a pipe,
a sweep) and above the bar on a terminal. Printing reads values the trainer has already
synchronised: nothing here changes a metric or a weight.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

ESTIMATE_AFTER = 10   # iterations timed for the early estimate


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 2h07m."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def eval_line(metrics: dict[str, Any], total: int, iterations_per_epoch: int,
              seconds_per_iteration: float | None) -> str:
    """One evaluation as one line (see the module docstring)."""
    it = metrics["iteration"]
    parts = [f"epoch {metrics['epoch']:g}/{total / iterations_per_epoch:g} "
             f"(iteration {it}/{total}):"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr"):
        if key in metrics:
            parts.append(f"{key} {_num(metrics[key])}")
    parts.append(f"elapsed {duration(metrics['elapsed_s'])}")
    if seconds_per_iteration is not None and it < total:
        parts.append(f"ETA {duration(seconds_per_iteration * (total - it))}")
    return " ".join(parts)


class EarlyEstimate:
    """Measured speed of a fit; `line()` once, after `ESTIMATE_AFTER` timed iterations."""

    def __init__(self, start: int, total: int, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter, after: int = ESTIMATE_AFTER):
        self.start, self.total, self.sync, self.clock = start, total, sync, clock
        self.first = start + 1                   # timing starts when this iteration is done
        self.report_at = self.first + after
        self.t_first: float | None = None
        self.t_fit = clock()
        self.done = total < self.report_at       # too short a run to be worth an estimate

    def seconds_per_iteration(self, iteration: int) -> float | None:
        """Mean time per iteration of this fit so far (evaluations included), or None."""
        done = iteration - self.start
        return (self.clock() - self.t_fit) / done if done > 0 else None

    def tick(self, iteration: int) -> str | None:
        """Call after each iteration; returns the estimate line once."""
        if self.done:
            return None
        if iteration == self.first:
            self.sync()
            self.t_first = self.clock()
        elif iteration == self.report_at and self.t_first is not None:
            self.sync()   # the device's queue must be empty for the time to mean anything
            per = (self.clock() - self.t_first) / (self.report_at - self.first)
            self.done = True
            return (f"measured {per:.3g} s per iteration over iterations {self.first + 1}-"
                    f"{self.report_at}: the {self.total - iteration} left take about "
                    f"{duration(per * (self.total - iteration))} at this speed "
                    "(evaluations and checkpoints not counted)")
        return None
