"""Reader and writer for the idx format of (Fashion-)MNIST, plain or gzip-compressed.

Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one
big-endian uint32 per dimension, then the data in C order.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

_UBYTE = 0x08


def read_idx(path: str | Path) -> torch.Tensor:
    """Return the uint8 array stored in an idx file (`.gz` is decompressed on the fly)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:   # truncated or not gzip
        raise ValueError(f"{path} is not a complete gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != _UBYTE:
        raise ValueError(f"{path}: idx type 0x{raw[2]:02x} is not supported (only unsigned bytes)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated (its header is incomplete)")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes "
                         "(truncated or corrupt)")
    return torch.from_numpy(data.reshape(shape).copy())


def write_idx(path: str | Path, array) -> None:
    """Write a uint8 array as an idx file; gzip-compress it when the name ends in `.gz`."""
    path = Path(path)
    array = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
