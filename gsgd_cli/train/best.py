"""`train.keep_best=METRIC`: keep the model of the evaluation with the best METRIC in
`<run dir>/best.pt` (written atomically; read back by `gsgd eval RUN_DIR --checkpoint best`).

METRIC is one of the logged evaluation values; accuracies count higher as better, losses lower.
`best.pt` holds `model` (the state dict), `iteration`, `metric` and `value`. A resumed run
reads the value to beat from the file, so the best model of the whole run is kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import load, save_atomic
from gsgd_cli.errors import UserError

BEST = "best.pt"
METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss")


class BestModel:
    def __init__(self, metric: str | None, run_dir: Path, has_val: bool):
        if metric is not None and metric not in METRICS:
            raise UserError(f"Invalid train.keep_best={metric!r}. Must be null or one of: "
                            f"{', '.join(METRICS)}.")
        if metric is not None and metric.startswith("val_") and not has_val:
            raise UserError(f"train.keep_best={metric} needs a validation split: set "
                            "data.val_size=N (held out of the training set), or choose "
                            "another metric.")
        self.metric, self.path = metric, Path(run_dir) / BEST
        self.value: float | None = None

    def load_previous(self) -> None:
        """On resume: the value the kept model reached (a value of another metric is not)."""
        if self.metric is not None and self.path.is_file():
            state = load(self.path)
            if state.get("metric") == self.metric:
                self.value = state.get("value")

    def offer(self, metrics: dict[str, Any], model: nn.Module) -> None:
        """Keep `model` when this evaluation beats the best so far (strictly)."""
        if self.metric is None:
            return
        value = metrics[self.metric]
        if value != value:   # NaN never wins
            return
        higher = self.metric.endswith("_acc")
        if self.value is not None and not (value > self.value if higher else value < self.value):
            return
        self.value = value
        save_atomic({"model": model.state_dict(), "optimizer": None,   # weights only
                     "iteration": metrics["iteration"],
                     "metric": self.metric, "value": value}, self.path)
