"""The composed config read into plain values, once, with one line for each bad value."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from gsgd_cli.errors import UserError
from gsgd_cli.train import Schedule, TrainSettings
from gsgd_cli.train.distributed import Ranks

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"Invalid {name}={value!r}. Must be true or false.")
    return value


def settings_from_cfg(cfg: DictConfig, progress: bool | None) -> TrainSettings:
    t = cfg.train
    if cfg.dtype not in DTYPES:
        raise UserError(f"Invalid dtype={cfg.dtype!r}. Must be float32 or float64.")
    return TrainSettings(epochs=t.epochs, iterations=t.iterations, batch_size=t.batch_size,
                         eval_every=t.eval_every, eval_batch_size=t.eval_batch_size,
                         checkpoint_every=t.checkpoint_every, seed=cfg.seed, progress=progress,
                         tensorboard=flag("train.tensorboard", t.tensorboard), dtype=DTYPES[cfg.dtype],
                         sync_every=t.get("sync_every", 1000),
                         cuda_graphs=flag("train.cuda_graphs", t.get("cuda_graphs", False)),
                         keep_best=t.get("keep_best"))


def schedule_from_cfg(cfg: DictConfig) -> Schedule:
    s = cfg.schedule
    milestones = s.get("milestones") or ()
    if isinstance(milestones, (int, float, str)):   # schedule.milestones=80: one milestone
        milestones = [milestones]
    return Schedule(kind=s.name, unit=s.get("unit", "epoch"),
                    milestones=tuple(milestones), gamma=s.get("gamma", 0.1))


def progress_from_cfg(cfg: DictConfig, multirun: bool) -> bool | None:
    value = cfg.progress
    if value in ("auto", None):
        return False if multirun else None
    if isinstance(value, bool):
        return value
    raise UserError(f"Invalid progress={value!r}. Must be auto, true or false.")


def check_complete(cfg: DictConfig) -> None:
    """`???` values, e.g. the lambdas that experiment=fig8 asks for, are one line."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        key = str(exc).splitlines()[0].rsplit("Missing mandatory value: ", 1)[-1]
        if getattr(exc, "full_key", None) == "model._target_":
            raise UserError("model=custom needs model._target_: the import path of your "
                            "nn.Module, e.g. model._target_=my_pkg.nets.MyNet") from None
        raise UserError(f"No value for {key} (it is ???): set it on the command line, e.g. "
                        f"{key}=VALUE (the experiment preset's header says what to use).") from None


def sync_bn_from_cfg(cfg: DictConfig, device: torch.device, ranks: Ranks) -> bool:
    value = (cfg.get("distributed") or {}).get("sync_bn", False)
    if not flag("distributed.sync_bn", value):
        return False
    if device.type != "cuda":
        raise UserError("distributed.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPUs "
                        f"only; this run is on {device}); drop it to keep per-process batch "
                        "statistics.")
    return ranks.distributed
