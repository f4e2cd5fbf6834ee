"""The names of the files a training run writes into its run directory, and of its metrics."""
from __future__ import annotations


CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TB_DIR = "tb"
METRIC_KEYS = ("iteration", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
               "elapsed_s")
VAL_KEYS = ("val_loss", "val_acc")   # also logged when data.val_size > 0
