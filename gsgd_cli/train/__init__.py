"""Hydra-independent training: `Trainer`, `TrainSettings`, `Schedule`, `UserError`."""
from gsgd_cli.errors import DataNotFoundError, UserError
from .layout import CHECKPOINT, METRIC_KEYS, METRICS, SUMMARY, TB_DIR
from .schedule import Schedule
from .settings import TrainSettings
from .trainer import Trainer

__all__ = ["Trainer", "TrainSettings", "Schedule", "UserError", "DataNotFoundError",
           "CHECKPOINT", "METRICS", "SUMMARY", "TB_DIR", "METRIC_KEYS"]
