"""Building, caching and loading the fused CPU kernels (every `*.cpp` here, one library),
written once for all optimizers.

Why plain C++ through ctypes and not `torch.utils.cpp_extension`: the kernels need no torch
headers, so they compile in seconds with `c++ -O3 -fopenmp` instead of ~25 s, and need only a
C++ compiler (no ninja, no Python headers). The library links `libgomp.so.1`, which the dynamic
loader resolves to the OpenMP runtime torch has already loaded, so it shares torch's threads and
`torch.set_num_threads`. It is cached under `$GSGD_CACHE_DIR` (default `~/.cache/gsgd`), keyed
by a hash of the sources, compiler and flags; concurrent processes build into temporary files
and rename, so a sweep's jobs never see a half-written library. Without a compiler the
optimizers warn once and use their eager steps (same result, slower).
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

HERE = Path(__file__).parent
# every kernel source, compiled into one library (the header is hashed with them)
SOURCES = sorted(HERE.glob("*.cpp"))
HEADERS = sorted(HERE.glob("*.h"))
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared"]
NATIVE = ["-march=native"]    # the vector units torch's own kernels use (AVX2/AVX-512): ~2x

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_warned = False

# The C functions of the kernels: name -> (return type, argument types). Each interface module
# (gsgd.py, path_sgd.py) adds its own with `declare` when it is imported.
SIGNATURES: dict[str, tuple] = {}


def declare(name: str, restype, argtypes: list) -> None:
    """Declare a C function of a kernel source: checked and typed when the library loads."""
    SIGNATURES[name] = (restype, list(argtypes))


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
    source = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in SOURCES + HEADERS)
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
            result = subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES)],
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
                for name, (restype, argtypes) in SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype = restype
                    fn.argtypes = argtypes
                _library = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _failure = str(exc)
        if _library is None and not _warned:
            _warned = True
            warnings.warn(f"gsgd: the fused CPU step is not available ({_failure}); using the "
                          "eager step instead (same result, slower). Install a C++ compiler "
                          "with OpenMP (e.g. g++) to get it, or pass fused=False to silence "
                          "this warning.", RuntimeWarning, stacklevel=3)
        return _library


def supports(tensors: list[torch.Tensor]) -> bool:
    """The kernels take float32/float64 contiguous CPU tensors, all of one dtype."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)
