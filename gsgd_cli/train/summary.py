"""The run's `summary.json`: status, final and best results, budget, and the caller's extras."""
from __future__ import annotations

import json
from typing import Any

import torch

from .checkpoint import write_text_atomic
from .layout import SUMMARY


def write_summary(trainer: Any) -> dict[str, Any]:
    last = trainer.last_metrics or {}
    summary = {
        "status": trainer.status,
        "message": trainer.message or None,
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": trainer.best_test_acc,
        "final_test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "iterations": trainer.iteration,
        "iterations_per_epoch": trainer.iterations_per_epoch,
        "epochs": round(trainer.iteration / trainer.iterations_per_epoch, 4),
        "wall_time_s": round(trainer._elapsed(), 3),
        "seed": trainer.settings.seed,
        "torch_version": torch.__version__,
        "device": str(trainer.data.device),
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    if trainer.data.has_val:
        summary.update(final_val_acc=last.get("val_acc"), best_val_acc=trainer.best_val_acc,
                       final_val_loss=last.get("val_loss"), val_size=len(trainer.data.val_y))
    summary.update(trainer.extra_summary)
    if trainer.ranks.writer:
        write_text_atomic(json.dumps(summary, indent=2) + "\n", trainer.run_dir / SUMMARY)
    return summary
