"""One training step (forward, loss, backward, optimizer step) without waiting for the device,
and its CUDA-graph form.

`TrainStep` returns the loss and the number of correct predictions as device tensors: nothing
in it reads a device value, so on a GPU the host runs ahead and queues the next steps. The
trainer copies both numbers into `RunningSums` and reads them only at its sync points
(evaluation, logging, checkpoints, and every `sync_every` iterations).

`GraphStep` (`train.cuda_graphs=true`) captures the whole step of one batch in a CUDA graph
once and replays it for every later batch, so that a small model is not bound by kernel
launches: the batch is copied into static input tensors, the graph replays the forward pass,
the backward pass and the optimizer step. The learning rate is a constant of the captured
optimizer step: the graph is captured again when the schedule changes it (the default schedules
change it at most once per epoch; a schedule that changes it every iteration is refused). The
first `WARMUP` steps run as ordinary steps (on a side stream, as CUDA graphs require): they are
real training steps, so a run with graphs follows the same iterations as one without.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsgd_cli.errors import UserError


WARMUP = 3


class TrainStep:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        return self.forward_backward_step(x, y)

    def forward_backward_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        hits = (out.detach().argmax(1) == y).sum()
        self.optimizer.step()
        return loss.detach(), hits


class GraphStep(TrainStep):
    """`TrainStep` captured in a CUDA graph (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model, optimizer)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lrs: list | None = None
        self.calls = 0
        self.captures = 0
        self._static: tuple[Tensor, Tensor] | None = None
        self._outputs: tuple[Tensor, Tensor] | None = None

    def _lrs(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.calls <= WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = super().__call__(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return result
        if self.graph is None or self.graph_lrs != self._lrs():
            self._capture(x, y)
        static_x, static_y = self._static
        static_x.copy_(x)
        static_y.copy_(y)
        self.graph.replay()
        return self._outputs

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.graph = None                     # frees the previous graph's memory pool
        self._static = (x.clone(), y.clone())
        self.optimizer.zero_grad(set_to_none=True)   # gradients are allocated in the graph
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._outputs = self.forward_backward_step(*self._static)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                f"train.cuda_graphs=true: the training step could not be captured in a CUDA "
                f"graph ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "run with train.cuda_graphs=false (an optimizer with strict=True waits for the "
                "device in every step and cannot be captured)") from exc
        self.graph = graph
        self.graph_lrs = self._lrs()
        self.captures += 1


class RunningSums:
    """Per-iteration losses and correct counts kept on the device until the next sync point."""

    def __init__(self, size: int, device: torch.device, ranks=None):
        """`ranks`: a `distributed.Ranks` of a data-parallel run (every rank keeps its own
        share's values; `take` averages the losses and sums the correct counts over them)."""
        self.ranks = ranks
        self.losses = torch.zeros(size, dtype=torch.float64, device=device)
        self.hits = torch.zeros(size, dtype=torch.int64, device=device)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count == len(self.losses)

    def add(self, loss: Tensor, hits: Tensor) -> None:
        self.losses[self.count].copy_(loss)
        self.hits[self.count].copy_(hits)
        self.count += 1

    def take(self) -> tuple[list[float], list[int]]:
        """The pending values (one device sync), and the buffer emptied; in a data-parallel
        run those of the global batch, the same on every rank (one all-reduce)."""
        n = self.count
        self.count = 0
        if n == 0:
            return [], []
        values = torch.cat([self.losses[:n], self.hits[:n].double()])
        ranks = self.ranks
        if ranks is not None and ranks.world_size > 1:
            ranks.sum_(values)
            values[:n] /= ranks.world_size
        values = values.tolist()
        return values[:n], [int(h) for h in values[n:]]


def make_step(trainer: Any) -> TrainStep:
    if not trainer.settings.cuda_graphs:
        return TrainStep(trainer.train_model, trainer.optimizer)
    if trainer.ranks.distributed:
        raise UserError("train.cuda_graphs=true is for one process; a data-parallel run "
                        "(torchrun, srun) all-reduces the gradients between the processes "
                        "in every step. Drop train.cuda_graphs=true.")
    if trainer.data.device.type != "cuda":
        raise UserError(f"train.cuda_graphs=true needs a CUDA device (the data and model "
                        f"are on {trainer.data.device}); set device=cuda or drop it.")
    if trainer.schedule.kind == "exponential" and trainer.schedule.unit == "iteration":
        raise UserError("train.cuda_graphs=true captures the learning rate in the graph "
                        "and captures again when it changes; schedule=exponential with "
                        "schedule.unit=iteration changes it every iteration. Use "
                        "schedule.unit=epoch or train.cuda_graphs=false.")
    return GraphStep(trainer.model, trainer.optimizer)
