"""Fused CPU steps of GSGD and PathSGD: `native/fused_steps.cpp`, compiled on first use and
called with ctypes.

The G-SGD kernel does a whole G-SGD step (every chain block and the plain-SGD parameters outside
them) in one call: one read pass per layer for the per-node sums, the largest |dw| and the
finiteness checks, the per-node vectors in short loops over the nodes, then, only if every
check passed, one write pass per layer. The formulas are those of `gsgd_cli.gspace.update`
(the readable reference); `tests/test_fused_step.py` checks the two against each other and
against the brute-force reference.

The Path-SGD kernel takes kappa (computed as before, by the squared-weight copy) and does the
division, the guard and the update in one read and one write pass per parameter, instead of
about ten tensor operations.

Why plain C++ through ctypes and not `torch.utils.cpp_extension`: the kernel needs no torch
headers, so it compiles in about 2 s with `c++ -O3 -fopenmp` instead of ~25 s, and needs only a
C++ compiler (no ninja, no Python headers). It links `libgomp.so.1`, which the dynamic loader
resolves to the OpenMP runtime torch has already loaded, so it shares torch's threads and
`torch.set_num_threads`. The library is cached under `$GSGD_CACHE_DIR` (default
`~/.cache/gsgd`), keyed by a hash of the source, compiler and flags; concurrent processes
build into temporary files and rename, so a sweep's jobs never see a half-written library.
Without a compiler the optimizer warns once and uses the eager step (same result, slower).

Record layout (float64 tensors owned by the optimizer):
* `status = [calls, failed_at]`: the kernel adds 1 to `calls` on every call; the first call
  whose checks fail writes nothing and sets `failed_at = calls`; while `failed_at != 0` every
  call writes nothing (the caller raises and then resets it).
* `diag` (zeroed by the caller): for each block with L layers, `L` flags "dw of layer i is not
  finite", `L` flags for the bias gradients, then `pivot bad, pivot index, ratio`, then `L`
  flags "the update of layer i could overflow"; after all blocks, one flag per outside
  parameter "its gradient is not finite".
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "fused_steps.cpp"
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared"]
NATIVE = ["-march=native"]    # the vector units torch's own kernels use (AVX2/AVX-512): ~2x
ROLES = {"in": 0, "pivot": 1, "out": 2}
PTRS_PER_LAYER = 6

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_warned = False


def cache_dir() -> Path:
    explicit = os.environ.get("GSGD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gsgd"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpu_signature() -> bytes:
    """The CPU model and instruction-set flags: a library built with -march=native is only
    reused on a CPU that has the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted).encode()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     version.encode(), platform.machine().encode(),
                                     _cpu_signature()]))
    directory = cache_dir()
    target = directory / f"fused_steps-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fused_steps-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        for flags in (FLAGS + NATIVE, FLAGS):   # without -march=native if the compiler refuses it
            result = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"{Path(compiler).name} failed: {lines[0] if lines else '?'}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built and loaded on first use; None (with one warning) if it
    cannot be built."""
    global _library, _failure, _warned
    with _lock:
        if _library is None and _failure is None:
            compiler = _compiler()
            try:
                if compiler is None:
                    raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} "
                                       "is not on PATH)")
                lib = ctypes.CDLL(str(_build(compiler)))
                for name in ("gsgd_step_f32", "gsgd_step_f64"):
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_int64
                    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int]
                for name in ("path_sgd_step_f32", "path_sgd_step_f64"):
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_int64
                    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5
                                   + [ctypes.c_int])
                _library = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _failure = str(exc)
        if _library is None and not _warned:
            _warned = True
            warnings.warn(f"GSGD: the fused CPU step is not available ({_failure}); using the "
                          "eager step instead (same result, slower). Install a C++ compiler "
                          "with OpenMP (e.g. g++) to get it, or pass fused=False to silence "
                          "this warning.", RuntimeWarning, stacklevel=3)
        return _library


def diag_size(layer_counts: list[int], num_outside: int) -> int:
    return sum(3 * n + 3 for n in layer_counts) + num_outside


class FusedCPUStep:
    """The static description of an optimizer's blocks for the kernel, and the call."""

    def __init__(self, lib: ctypes.CDLL, plans, outside: list[torch.Tensor], per_tap: bool):
        self._functions = {torch.float32: lib.gsgd_step_f32, torch.float64: lib.gsgd_step_f64}
        desc = [len(plans)]
        for plan in plans:
            skeleton = plan.skeleton
            desc += [len(skeleton.layers), skeleton.pivot_layer]
            for layer, bn in zip(skeleton.layers, plan.block.bn_after):
                desc += [ROLES[layer.role], layer.n_out, layer.n_in, layer.kernel, layer.centre,
                         int(bool(bn) and not per_tap)]
        desc += [len(outside)] + [p.numel() for p in outside]
        self._desc = (ctypes.c_int64 * len(desc))(*desc)
        self._num_ptrs = (sum(PTRS_PER_LAYER * len(plan.weights) + 1 for plan in plans)
                          + 3 * len(outside))
        self._ptrs = (ctypes.c_int64 * self._num_ptrs)()
        self._opts = (ctypes.c_double * 5)()
        self._addresses = [ctypes.addressof(self._desc), ctypes.addressof(self._ptrs),
                           ctypes.addressof(self._opts)]
        self.per_tap = per_tap

    @staticmethod
    def supports(tensors: list[torch.Tensor]) -> bool:
        dtype = tensors[0].dtype
        return dtype in (torch.float32, torch.float64) and all(
            t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)

    def __call__(self, pointers: list[int], options, status: torch.Tensor, diag: torch.Tensor,
                 dtype: torch.dtype) -> int:
        """Run the kernel: `pointers` are the data pointers laid out as `desc` says (0 for a
        missing tensor); `status` and `diag` are the record's (see the module docstring)."""
        self._ptrs[:] = pointers
        self._opts[:] = (options.lr, options.momentum, options.weight_decay, options.bpr,
                         options.min_ratio)
        return self._functions[dtype](*self._addresses, status.data_ptr(), diag.data_ptr(), torch.get_num_threads())


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
