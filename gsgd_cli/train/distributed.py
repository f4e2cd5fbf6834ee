"""Data-parallel training across processes with torch.distributed (DDP).

One run, several processes ("ranks"), one model replica each. Every rank takes its share of the
same global batch (`train.batch_size` is the global batch), `DistributedDataParallel` averages
the gradients, and every rank applies the same optimizer step to the same averaged gradient, so
the replicas stay identical (checked at every checkpoint). Rank 0 alone reads and writes the run
directory; the others receive what they need from it.

How the processes are started (`from_environment()` reads the launcher's variables):

* `torchrun` (or anything that sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`):
  `env://` initialisation;
* a SLURM job step with several tasks (`srun` sets `SLURM_STEP_NUM_TASKS` > 1): rank
  `SLURM_PROCID`, node `SLURM_NODEID`, the first host of `SLURM_STEP_NODELIST` as the rendezvous
  (`scontrol show hostnames`), port `MASTER_PORT` or one derived from the job and step ids;
* a submitit job with several tasks (`hydra/launcher=submitit_*` with `tasks_per_node` > 1):
  submitit's `TorchDistributedEnvironment`.

Backend: gloo on the CPU, NCCL for CUDA tensors (`cpu:gloo,cuda:nccl` when CUDA is there), plus a
gloo group for small control messages (configs, checkpoints, flags), so that these never wait
for the GPU. `Ranks` is what the rest of the code sees: `SINGLE` (one process, every collective
a no-op) or a started process group.

Agreement: every decision that stops or branches a run is taken by all ranks together.
`agree(fn)` runs `fn` on every rank and raises the first rank's `UserError` on all of them;
`from_writer(fn)` runs `fn` on rank 0 only (it reads the run directory) and hands the result, or
its `UserError`, to every rank. A rank that fails in any other way (a crash) ends its process;
the launcher then stops the others (torchrun does; with srun pass `--kill-on-bad-exit=1`).
"""
from __future__ import annotations

import gc
import os
import subprocess
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from gsgd_cli.errors import UserError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)   # a collective waiting longer than this fails the run


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a multi-process run, as its launcher says."""

    rank: int
    world_size: int
    node: int            # index of this process's node (the local ranks share it)
    init_method: str     # "env://" or "tcp://HOST:PORT"
    launcher: str        # torchrun | slurm | submitit


def from_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The multi-process launch this process belongs to, or None for a plain single process.

    A submitit job with one task, an `sbatch` batch script (`SLURM_NTASKS` but no job step)
    and `srun -n 1` are single processes."""
    env = os.environ if environ is None else environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        node = env.get("GROUP_RANK") or env.get("SLURM_NODEID") or "0"
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(node), "env://", "torchrun")
    if env.get("SUBMITIT_EXECUTOR"):
        return _submitit_launch(env)
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) > 1 and "SLURM_PROCID" in env:
        host = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_STEP_NODELIST")
                                                     or env.get("SLURM_JOB_NODELIST", ""))
        port = env.get("MASTER_PORT") or str(_port_for(env.get("SLURM_JOB_ID", "0"),
                                                       env.get("SLURM_STEP_ID", "0")))
        return Launch(int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_NODEID", "0")),
                      f"tcp://{host}:{port}", "slurm")
    return None


def _submitit_launch(env: Mapping[str, str]) -> Launch | None:
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return None
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    return Launch(job.global_rank, job.num_tasks, job.node,
                  f"tcp://{dist_env.master_addr}:{dist_env.master_port}", "submitit")


def _port_for(job_id: str, step_id: str) -> int:
    """A port from 20000 to 59999 that every task of a SLURM job step derives alike."""
    return 20000 + zlib.crc32(f"{job_id}.{step_id}".encode()) % 40000


def _first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (`node[03-05,09]` -> `node03`)."""
    if not nodelist:
        raise UserError("a SLURM job step with several tasks but no SLURM_STEP_NODELIST: set "
                        "MASTER_ADDR (and MASTER_PORT) to the first node's host name.")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        raise UserError(f"cannot expand the SLURM node list {nodelist!r} (scontrol show "
                        "hostnames failed): set MASTER_ADDR to the first node's host "
                        "name.") from None
    return out[0]


@dataclass
class Ranks:
    """This process's rank in a run, and the collectives the trainer needs.

    `SINGLE` (the default) stands for a plain one-process run: `distributed` is False, and every
    collective returns its input."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"
    backend: str | None = None    # torch.distributed's backend ("gloo", "cpu:gloo,cuda:nccl")
    distributed: bool = False
    control: Any = field(default=None, repr=False)   # gloo group: objects and CPU flags
    node: Any = field(default=None, repr=False)      # gloo group of this node's ranks
    node_leader: int = 0                              # global rank of this node's local rank 0

    @property
    def writer(self) -> bool:
        """Rank 0: the only process that reads or writes the run directory."""
        return self.rank == 0

    # -- control messages (gloo, CPU) ----------------------------------------------------------
    def broadcast(self, obj: T = None, src: int = 0) -> T:
        """`obj` of rank `src`, on every rank (pickled; for configs, checkpoints, messages
        between our own processes)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.control)
        return out

    def agree(self, fn: Callable[[], T]) -> T:
        """`fn()` on every rank; if it raised `UserError` on any rank, the first such rank's
        message is raised on all of them (so that all leave the run at the same point)."""
        if not self.distributed:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
        errors = self.gather(error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise UserError(first)
        return result

    def from_writer(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0 only; its result (or its `UserError`) on every rank."""
        if not self.distributed:
            return fn()
        message: tuple[str, Any] = ("ok", None)
        if self.writer:
            try:
                message = ("ok", fn())
            except UserError as exc:
                message = ("error", str(exc))
        kind, value = self.broadcast(message)
        if kind == "error":
            raise UserError(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def min_or_none(self, value: int | None) -> int | None:
        """The smallest `value` over the ranks (None on a rank: no value)."""
        if not self.distributed:
            return value
        big = torch.iinfo(torch.int64).max
        t = torch.tensor([big if value is None else value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.control)
        return None if t.item() == big else int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier(group=self.control)

    # -- device tensors (NCCL on CUDA, gloo on the CPU) ----------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (no host sync on CUDA)."""
        if self.distributed and self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank, as DDP does before
        each training forward pass: evaluation and checkpoints then use the same model."""
        if self.distributed and self.world_size > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def differing_tensors(self, model: nn.Module) -> list[str]:
        """Names of the parameters and buffers in which any rank's model differs bitwise from
        rank 0's (the same list on every rank; empty when the replicas are identical)."""
        if not self.distributed or self.world_size == 1:
            return []
        local = []
        for name, tensor in model.state_dict().items():
            reference = tensor.detach().clone(memory_format=torch.contiguous_format)
            torch.distributed.broadcast(reference, src=0)
            if not torch.equal(reference, tensor):
                local.append(name)
        found = self.gather(local)
        return sorted({name for names in found for name in names})

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module that trains: `DistributedDataParallel(model)` in a distributed run (its
        constructor copies rank 0's parameters and buffers to every rank), else `model`."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of `n` rows (`n` divisible by the world size)."""
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)


SINGLE = Ranks()


class StopVote:
    """All ranks stop at the same iteration when any of them was asked to (a signal).

    Called once per iteration with this rank's request (a signal number or None): every rank
    sends its request (the largest wins) without waiting, and reads the vote it sent one
    iteration before, so the ranks stop together one iteration after the first request, and
    the vote costs no wait in practice. A single process stops at once."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, request: int | None) -> int | None:
        if not self.ranks.distributed:
            return request
        agreed = self._collect()
        if agreed is None:
            ballot = torch.tensor([request or 0], dtype=torch.int64)
            work = torch.distributed.all_reduce(ballot, op=torch.distributed.ReduceOp.MAX,
                                                group=self.ranks.control, async_op=True)
            self._pending = (work, ballot)
        return agreed

    def _collect(self) -> int | None:
        if self._pending is None:
            return None
        work, ballot = self._pending
        self._pending = None
        work.wait()
        return int(ballot.item()) or None

    def close(self) -> None:
        """Wait for the last vote (every rank sent it)."""
        self._collect()


def start(launch: Launch) -> Ranks:
    """Initialise torch.distributed for `launch` and build `Ranks` (node groups included)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if launch.init_method != "env://":
        kwargs.update(rank=launch.rank, world_size=launch.world_size)
    try:
        dist.init_process_group(backend, init_method=launch.init_method, timeout=TIMEOUT,
                                **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:   # DistNetworkError is a RuntimeError
        where = ("MASTER_ADDR/MASTER_PORT" if launch.init_method == "env://"
                 else launch.init_method)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"rank {launch.rank} of {launch.world_size} ({launch.launcher}) could "
                        f"not join the others at {where} ({first[:200]}); check that every "
                        "process can reach that host and port.") from None
    control = dist.new_group(backend="gloo", timeout=TIMEOUT)
    nodes = [None] * launch.world_size
    dist.all_gather_object(nodes, launch.node, group=control)
    members: dict[int, list[int]] = {}
    for rank, node in enumerate(nodes):
        members.setdefault(node, []).append(rank)
    mine = None
    for node in sorted(members, key=lambda n: members[n][0]):   # every rank creates every group
        group = dist.new_group(ranks=members[node], backend="gloo", timeout=TIMEOUT)
        if node == launch.node:
            mine = group
    local = members[launch.node]
    return Ranks(rank=launch.rank, world_size=launch.world_size,
                 local_rank=local.index(launch.rank), local_world_size=len(local),
                 launcher=launch.launcher, backend=backend, distributed=True,
                 control=control, node=mine,
                 node_leader=local[0])


def stop(ranks: Ranks) -> None:
    """Leave the process group cleanly: free what holds communication buffers, wait for the
    others, then destroy the group (without the wait, gloo sometimes aborts at exit)."""
    import torch.distributed as dist

    if not ranks.distributed or not dist.is_initialized():
        return
    gc.collect()
    try:
        dist.barrier(group=ranks.control)
    finally:
        dist.destroy_process_group()


# -- the data, read once per node ---------------------------------------------------------------

def share_within_node(ranks: Ranks, load: Callable[[], T]) -> T:
    """`load()` on each node's first rank only (which may download or unpack files; no other
    process touches the data folder), its result sent to the node's other ranks. Any rank's
    `UserError` (missing data, ...) is raised on every rank."""
    if not ranks.distributed:
        return load()
    leader = ranks.local_rank == 0
    value = ranks.agree(lambda: load() if leader else None)
    if ranks.local_world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=ranks.node_leader, group=ranks.node)
    return box[0]
