"""Path-SGD's fused CPU step (`path_sgd_step.cpp`): the kernel takes kappa (from
`pathnorm.step.kappa`) and does the division, the guard and the update in one read and one
write pass per parameter, instead of about ten tensor operations; `fused_step` packs the
pointers and calls it. The readable reference is `gsgd_cli.pathnorm.step`."""
from __future__ import annotations

import ctypes

import torch

from .build import declare, library, supports

__all__ = ["FusedPathStep", "fused_step"]

for _name in ("path_sgd_step_f32", "path_sgd_step_f64"):
    declare(_name, ctypes.c_int64,
            [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int])


class FusedPathStep:
    """PathSGD's kernel call: `pointers` = (weight, grad or 0, kappa or 0) per parameter."""

    def __init__(self, lib: ctypes.CDLL, params: list[torch.Tensor]):
        self._functions = {torch.float32: lib.path_sgd_step_f32,
                           torch.float64: lib.path_sgd_step_f64}
        self._numels = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
        self._n = len(params)
        self._ptrs = (ctypes.c_int64 * (3 * len(params)))()
        self._opts = (ctypes.c_double * 3)()

    def __call__(self, pointers: list[int], lr: float, eps: float, rescale: str | None,
                 ratio: torch.Tensor, status: torch.Tensor, diag: torch.Tensor,
                 dtype: torch.dtype) -> int:
        self._ptrs[:] = pointers
        self._opts[:] = (lr, eps, {None: 0, "first": 1, "every": 2}[rescale])
        return self._functions[dtype](
            ctypes.addressof(self._numels), self._n, ctypes.addressof(self._ptrs),
            ctypes.addressof(self._opts), ratio.data_ptr(), status.data_ptr(), diag.data_ptr(),
            torch.get_num_threads())


def fused_step(opt, params, kappas, record, lr: float, eps: float, rescale) -> bool:
    """The division, guard and update of `opt` (a PathSGD: its `fused` flag, `_native` cache and
    state) in the kernel; False when it does not apply (then the tensor operations run).
    `kappas`: one per parameter (None where no path runs); `record`: the step record."""
    if opt.fused is False or record.device.type != "cpu":
        return False
    dtype = params[0].dtype
    if opt._native is None:
        lib = (library() if supports(list(params))
               else None)
        if lib is None:
            opt.fused = False
            return False
        opt._native = FusedPathStep(lib, list(params))
    ptrs = []
    for p, k in zip(params, kappas):
        g = p.grad
        if g is None:
            ptrs += [p.data_ptr(), 0, 0]
            continue
        if not (p.dtype == g.dtype == k.dtype == dtype and p.device.type == "cpu"
                and g.is_contiguous() and k.is_contiguous() and p.is_contiguous()):
            return False
        ptrs += [p.data_ptr(), g.data_ptr(), k.data_ptr()]
    state = opt.state[params[0]]
    ratio = None
    if rescale == "first":
        ratio = state.get("rescale_ratio")
        if ratio is None or ratio.dtype != torch.float64 or ratio.device.type != "cpu":
            ratio = torch.full((), float("nan"), dtype=torch.float64) if ratio is None \
                else ratio.detach().to("cpu", torch.float64).clone()
            state["rescale_ratio"] = ratio
    slot = ratio if ratio is not None else torch.zeros((), dtype=torch.float64)
    opt._native(ptrs, lr, eps, rescale, slot, record.status, record.diag, dtype)
    return True
