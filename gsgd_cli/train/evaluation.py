"""An evaluation of the model during training: test (and validation) loss and accuracy, summed
over the ranks, and its record: a `metrics.jsonl` line, TensorBoard scalars, the best-model
offer and the progress line."""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import append_text
from .layout import METRIC_KEYS, METRICS, VAL_KEYS
from .progress import eval_line


@torch.no_grad()
def evaluate(trainer: Any, split: str = "test") -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test (or the held-out validation) split.

    In a data-parallel run rank k evaluates the batches k, k + n, ... (with rank 0's
    batch-norm statistics) and the sums are added over the ranks: the batches are those of
    a single process, only the order of the final sum differs."""
    xs, ys = ((trainer.data.test_x, trainer.data.test_y) if split == "test"
              else (trainer.data.val_x, trainer.data.val_y))
    ranks = trainer.ranks
    ranks.broadcast_buffers(trainer.model)
    was_training = trainer.model.training
    trainer.model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.data.device)
    correct = torch.zeros((), dtype=torch.int64, device=trainer.data.device)
    n = len(ys)
    starts = range(0, n, trainer.settings.eval_batch_size)
    for start in starts[ranks.rank::ranks.world_size]:
        x = trainer.data.inputs(xs[start:start + trainer.settings.eval_batch_size],
                             train=False, dtype=trainer.settings.dtype)
        y = ys[start:start + trainer.settings.eval_batch_size]
        out = trainer.model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    trainer.model.train(was_training)
    ranks.sum_(loss_sum)
    ranks.sum_(correct)
    return loss_sum.item() / n, correct.item() / n


def record(trainer: Any, writer) -> None:
    test_loss, test_acc = evaluate(trainer, )
    metrics = {
        "iteration": trainer.iteration,
        "epoch": round(trainer.iteration / trainer.iterations_per_epoch, 4),
        "lr": trainer.lr(),
        "train_loss": trainer.loss_sum / trainer.seen if trainer.seen else float("nan"),
        "train_acc": trainer.correct / trainer.seen if trainer.seen else float("nan"),
        "test_loss": test_loss,
        "test_acc": test_acc,
        "elapsed_s": round(trainer._elapsed(), 3),
    }
    if trainer.data.has_val:
        metrics["val_loss"], metrics["val_acc"] = evaluate(trainer, "val")
        if trainer.best_val_acc is None or metrics["val_acc"] > trainer.best_val_acc:
            trainer.best_val_acc = metrics["val_acc"]
    if trainer.ranks.writer:
        append_text(trainer.run_dir / METRICS, json.dumps(metrics) + "\n")
        trainer.best_model.offer(metrics, trainer.model)
    if writer is not None:
        for key in METRIC_KEYS[1:] + (VAL_KEYS if trainer.data.has_val else ()):
            writer.add_scalar(key, metrics[key], trainer.iteration)
        writer.flush()
    trainer.last_metrics = metrics
    if trainer.best_test_acc is None or test_acc > trainer.best_test_acc:
        trainer.best_test_acc = test_acc
    if trainer._say is not None:
        rate = trainer._estimate.seconds_per_iteration(trainer.iteration) if trainer._estimate else None
        trainer._say(eval_line(metrics, trainer.total, trainer.iterations_per_epoch, rate))
    trainer._reset_running()
