"""Hydra-independent training: `Trainer`, `TrainSettings`, `Schedule`, `UserError`."""
from gsgd_cli.errors import DataNotFoundError, UserError
from .schedule import Schedule
from .trainer import CHECKPOINT, METRIC_KEYS, METRICS, SUMMARY, TB_DIR, Trainer, TrainSettings

__all__ = ["Trainer", "TrainSettings", "Schedule", "UserError", "DataNotFoundError",
           "CHECKPOINT", "METRICS", "SUMMARY", "TB_DIR", "METRIC_KEYS"]
