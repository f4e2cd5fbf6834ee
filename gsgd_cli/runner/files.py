"""What a job writes and prints around the trainer's own files: the `.hydra/` files, the failed
summary of a job that stopped on an error, the one-line result."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gsgd_cli import safe_files
from gsgd_cli.train import SUMMARY
from gsgd_cli.train.checkpoint import raise_disk_full
from gsgd_cli.train.rundir import HYDRA_DIR, RunDirectory


def save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`, as Hydra itself would write them."""
    folder = run_dir / HYDRA_DIR
    safe_files.make_dir(folder)
    hydra_cfg = HydraConfig.instance().cfg
    files = {folder / name: OmegaConf.to_yaml(node)
             for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                                ("overrides.yaml", hydra_cfg.hydra.overrides.task))}
    try:   # all three or none of them
        safe_files.write_all_or_none(files)
    except OSError as exc:
        raise_disk_full(exc, folder)   # one line
        raise


def summary_line(summary: dict[str, Any]) -> str:
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    status = ("already " if summary.get("skipped") else "") + str(summary["status"])
    return (f"gsgd train: {status} {summary['iterations']} iterations "
            f"({summary['epochs']:g} epochs) in {summary['wall_time_s']:.1f}s: "
            f"test_acc={fmt(summary['final_test_acc'])} (best {fmt(summary['best_test_acc'])}), "
            f"train_loss={fmt(summary['final_train_loss'])}; run dir {summary['run_dir']}"
            + ("; nothing to do" if summary.get("skipped") else ""))


def write_failed_summary(run_dir: Path, message: str) -> None:
    path = run_dir / SUMMARY
    summary = RunDirectory(run_dir).summary or {}
    summary.update(status="failed", message=message, run_dir=str(run_dir))
    try:   # never through a link; a full disk leaves the old file (or none), not an empty one
        safe_files.make_dir(run_dir)
        safe_files.write_atomic(path, json.dumps(summary, indent=2) + "\n")
    except OSError:   # e.g. the disk is full: the error line on stderr says what happened
        pass
