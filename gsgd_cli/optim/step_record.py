"""Failed optimizer steps recorded on the device, so that `step()` never waits for it.

A step computes its checks on the device, gates its writes by them (a failed step writes
nothing) and records the first failure here: `status = [calls, failed_at]` (float64) counts the
`step()` calls and holds the 1-based number of the first call that failed (0: none), and `diag`
says which check failed where (its layout belongs to the optimizer). While a failure is
recorded, every later step writes nothing, so the weights stay those before the failed step
until the error has been raised.

The optimizer raises the error
* in `check_steps()`, which waits for the device (a trainer calls it where it synchronises
  anyway: at evaluation, logging and checkpoints);
* at the start of the next `step()` when the failure is visible without waiting: on the CPU
  always; on CUDA once the asynchronous copy of the flag made after each step has landed
  (usually a step or two later);
* at once, in the failing `step()`, with `strict=True` (one device sync per step).
"""
from __future__ import annotations

import torch
from torch import Tensor


class StepRecord:
    def __init__(self, device: torch.device, diag_size: int):
        self.device = device
        self.status = torch.zeros(2, dtype=torch.float64, device=device)
        self.diag = torch.zeros(max(diag_size, 1), dtype=torch.float64, device=device)
        self._host_flag = None
        self._event = None
        self._cpu_view = self.status.numpy() if device.type == "cpu" else None
        if device.type == "cuda":
            self._host_flag = torch.zeros(1, dtype=torch.float64).pin_memory()
            self._event = torch.cuda.Event()

    def update(self, ok: Tensor, diag: Tensor) -> Tensor:
        """Count a call and record it if `ok` is False and nothing failed before; returns the
        gate: True where this step may write (its checks passed and no earlier one failed)."""
        calls, failed_at = self.status[0:1], self.status[1:2]
        calls.add_(1)
        clean = failed_at == 0
        first = clean & ~ok
        failed_at.copy_(torch.where(first, calls, failed_at))
        self.diag.copy_(torch.where(first, diag, self.diag))
        return (ok & clean).squeeze(0)

    def publish(self) -> None:
        """CUDA: start an asynchronous copy of the flag to the host (read by `visible`)."""
        if self._event is not None and not torch.cuda.is_current_stream_capturing():
            self._host_flag.copy_(self.status[1:2], non_blocking=True)
            self._event.record()

    def visible_failure(self) -> bool:
        """True if a failure is recorded and can be seen without waiting for the device."""
        if self._cpu_view is not None:
            return bool(self._cpu_view[1] != 0)
        if self._event is None or torch.cuda.is_current_stream_capturing():
            return False
        return bool(self._event.query()) and bool(self._host_flag[0] != 0)

    def failed(self) -> bool:
        """Waits for the device."""
        return bool(self.status[1] != 0)

    def take(self) -> tuple[int, int, list[float]]:
        """(failed call, calls since then, diag) of the recorded failure; clears the record so
        that later steps write again."""
        calls, failed_at = (int(v) for v in self.status.tolist())
        diag = self.diag.tolist()
        self.status[1] = 0
        self.diag.zero_()
        if self._host_flag is not None:
            self._host_flag.zero_()
        return failed_at, calls - failed_at, diag
