"""Where a job runs: its device, its CPU threads, the seed of each rank, the commit of the code."""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from gsgd_cli.errors import UserError
from gsgd_cli.train.distributed import SINGLE, Ranks


def resolve_device(name: Any, *, ranks: Ranks = SINGLE, job_num: int | None = None,
                   gpus: int | None = None) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda[:N]` must be available.

    Which GPU `auto` and `cuda` take when there are `gpus` of them (default: as many as torch
    sees): in a data-parallel run the one of the process's local rank (`local_rank mod gpus`),
    in job `job_num` of a sweep GPU `job_num mod gpus` (a joblib sweep on a node with several
    GPUs spreads its jobs over them), else the current one. `cuda:N` is that GPU, refused in a
    data-parallel run with several processes per node (they would share it)."""
    name = str(name)
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        name = "cuda" if gpus > 0 else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if gpus == 0:
            raise UserError(f"device={name} but CUDA is not available on this machine; "
                            "use device=cpu or device=auto.")
        if name != "cuda":
            if ranks.distributed and ranks.local_world_size > 1:
                raise UserError(f"device={name} would put all {ranks.local_world_size} processes "
                                "of this node on one GPU; use device=cuda or device=auto (each "
                                "process takes the GPU of its local rank).")
            return torch.device(name)
        if ranks.distributed:
            return torch.device("cuda", ranks.local_rank % gpus)
        if job_num is not None:
            return torch.device("cuda", job_num % gpus)
        return torch.device("cuda")
    raise UserError(f"Invalid device={name!r}. Must be auto, cpu, cuda or cuda:N.")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code was loaded from, with "-dirty" when tracked files had
    uncommitted changes. Read once per process: the jobs of a multirun share the code that
    was imported when the sweep started, even if the checkout moves on meanwhile."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


SMALL_MODEL = 1_000_000  # parameters; below this, intra-op threads only cost time on the CPU


def auto_threads(device: torch.device, num_parameters: int, *, parallel: int = 1,
                 cores: int | None = None, environ: Any = None) -> int | None:
    """The number of threads `cpu_threads=auto` sets (None: leave torch's default).

    1 for small models on the CPU; with `parallel` processes training at once on this node
    (the ranks of a data-parallel run on it, the jobs of a joblib sweep) each gets
    `cores // parallel` (at least 1), unless `OMP_NUM_THREADS` says otherwise (the launcher's
    or the user's choice: joblib sets it to cores // n_jobs in its workers, torchrun to 1)."""
    env = os.environ if environ is None else environ
    if device.type == "cpu" and num_parameters < SMALL_MODEL:
        return 1
    if parallel > 1 and not env.get("OMP_NUM_THREADS"):
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        return max(1, cores // parallel)
    return None


def set_cpu_threads(value: Any, device: torch.device, num_parameters: int,
                    parallel: int = 1) -> None:
    """`cpu_threads`: a positive integer, or `auto` (`auto_threads`).

    The MLPs' matrices are tiny: splitting them over threads gains nothing and is 100x slower
    when the cores are busy with other work (measured: 0.6 ms vs 80 ms per step on 2 shared
    cores), so `auto` uses one thread for them; processes that train at once on one node
    divide the cores between them.
    """
    if value == "auto":
        threads = auto_threads(device, num_parameters, parallel=parallel)
        if threads is not None:
            torch.set_num_threads(threads)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Invalid cpu_threads={value!r}. Must be auto or a positive integer.")
    torch.set_num_threads(value)


def parallel_jobs(launcher: Any) -> int:
    """How many jobs of a sweep run at once on this node: `n_jobs` of the joblib launcher
    (-1: one per core, -2: all but one, ...), else 1."""
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1
    n = launcher.get("n_jobs", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n == 0:
        return 1
    return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of torch's own generator on one rank of a data-parallel run (dropout masks
    differ between ranks; data order and augmentation use the shared data generator)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:8], "little")
