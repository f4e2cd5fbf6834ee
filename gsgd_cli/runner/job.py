"""One training job: config -> data, model, optimizer, trainer, on this process's device."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gsgd_cli.data import describe, fingerprint, load_data
from gsgd_cli.errors import UserError
from gsgd_cli.models import build_model
from gsgd_cli.train import Trainer, distributed, preemption
from gsgd_cli.train.distributed import SINGLE, Ranks
from gsgd_cli.train.rundir import RunDirectory

from . import console
from .environment import git_commit, rank_seed, resolve_device, set_cpu_threads
from .plan import plan as plan_run_dir
from .settings import (check_complete, progress_from_cfg, schedule_from_cfg, settings_from_cfg,
                       sync_bn_from_cfg)


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False,
        choices: dict[str, str] | None = None, directory: RunDirectory | None = None,
        on_claim=None, ranks: Ranks = SINGLE, job_num: int | None = None,
        parallel: int = 1) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary dict.

    `on_claim()` runs once the directory is this run's (every check passed, old files
    removed when asked), before training; the CLI writes `.hydra/` there. A run that was
    already finished (`resume=true` on a completed run with the same budget, or on a
    diverged one) is not touched: its summary comes back with `"skipped": True`.

    `ranks`: this process's place in a data-parallel run (every rank calls `run` with the same
    `cfg`; rank 0 alone reads and writes `run_dir`). `job_num`: the job's number in a sweep
    (picks its GPU); `parallel`: jobs running at once on this node (divides the CPU threads).
    """
    check_complete(cfg)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise UserError(f"Invalid seed={cfg.seed!r}. Must be an integer from 0 to 2**63-1.")
    settings = settings_from_cfg(cfg, progress_from_cfg(cfg, multirun))
    schedule = schedule_from_cfg(cfg)
    settings.validate()
    describe(cfg.data)  # checks data config values before any loading
    config = OmegaConf.to_container(cfg, resolve=True)
    device = ranks.agree(lambda: resolve_device(cfg.device, ranks=ranks, job_num=job_num))
    sync_bn = ranks.agree(lambda: sync_bn_from_cfg(cfg, device, ranks))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if ranks.writer:
        directory = directory or RunDirectory(run_dir)

    def plan():
        action, state = plan_run_dir(directory, cfg, config, settings, multirun)
        return action, state, directory.summary if action == "skip" else None

    action, state, old_summary = ranks.from_writer(plan)
    if action == "skip":
        return {**old_summary, "skipped": True}
    torch.manual_seed(cfg.seed)
    with fingerprint.collect() as data_files:   # what files were read, hashed as read
        if ranks.distributed:   # read on one rank per node, sent to the others
            data = distributed.share_within_node(ranks, lambda: load_data(cfg.data, "cpu"))
            data = data.to(device)
        else:
            data = load_data(cfg.data, device)
    if action == "resume":
        ranks.agree(lambda: fingerprint.check_same(run_dir, state.get("data_files"), data_files)
                    if ranks.writer else None)

    def build():
        try:
            return build_model(cfg.model, data.in_shape, data.num_classes)
        except ValueError as exc:
            raise UserError(f"model: {exc}") from None
        except (RuntimeError, MemoryError, OverflowError) as exc:   # e.g. model.width=10**9
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"model: cannot build it ({first}); is a width or size too "
                            "large?") from None

    model = ranks.agree(build).to(device=device, dtype=settings.dtype)
    set_cpu_threads(cfg.cpu_threads, device, sum(p.numel() for p in model.parameters()),
                    parallel=ranks.local_world_size if ranks.distributed else parallel)

    def make_optimizer():
        try:
            make = hydra.utils.instantiate(cfg.optimizer)
            kwargs = {}
            if cfg.optimizer.get("input_shape", "absent") is None:   # Path-SGD: kappa;
                kwargs["input_shape"] = tuple(data.in_shape)           # G-SGD: shapes
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                built = make(model, **kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"optimizer: {exc}") from None
        return built, [str(w.message) for w in caught]

    optimizer, notes = ranks.agree(make_optimizer)
    if ranks.writer:
        for note in notes:   # what the optimizer says about the model: one line each, on stdout
            print(f"gsgd train: note: {note}")
        for line in console.start_lines(optimizer, choices, cfg):
            print(f"gsgd train: {line}", flush=True)
    if sync_bn:   # after the optimizer, which traces the plain batch-norm layers; same parameters
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ranks.world_size > 1:
        torch.manual_seed(rank_seed(cfg.seed, ranks.rank))
    extra = {
        "git_commit": git_commit(),
        "config": {k: v for k, v in (choices or {}).items()
                   if v is not None and not k.startswith("hydra/")},
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "run_dir": str(run_dir),
        "cpu_threads": torch.get_num_threads(),
        "optimizer_notes": notes,
        "world_size": ranks.world_size,
        "distributed_backend": ranks.backend,
        "scheduler_job": preemption.scheduler_job_id(),
        "data_files": data_files or None,   # name: [size, sha256] (also in the checkpoint)
    }
    trainer = ranks.agree(lambda: Trainer(model, optimizer, data, run_dir, settings, schedule,
                                          extra_summary=extra, config=config, ranks=ranks))
    if multirun and job_num is not None:
        trainer.label = f"job {job_num}: "
    if action == "resume":   # every check of the checkpoint, before anything is written
        ranks.agree(lambda: trainer.restore(state))
    if ranks.writer:
        directory.claim(remove_old=action == "new")
        if on_claim is not None:
            try:
                on_claim()
            except Exception as exc:   # a resumed run is still its checkpoint: put it back
                exc.run_kept = action == "resume" and trainer.put_back()
                raise
    return trainer.fit(resume=action == "resume", state=state)
