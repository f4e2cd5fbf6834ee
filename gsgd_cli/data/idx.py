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

from gsgd_cli import safe_files

from . import fingerprint

_UBYTE = 0x08
MAX_BYTES = 1 << 28   # an idx file of MNIST's family holds at most 47 MB


def read_idx(path: str | Path, limit: int = MAX_BYTES) -> torch.Tensor:
    """Return the uint8 array stored in an idx file (`.gz` is decompressed, never beyond the
    size its header gives, and at most `limit` bytes). Only a regular file is read; its bytes
    are noted for the run's data fingerprint."""
    path = Path(path)
    stored = safe_files.read_bytes(path, limit, follow_links=True)
    fingerprint.note(path, stored)
    raw = _gunzip(path, stored, limit) if path.suffix == ".gz" else stored
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


def _gunzip(path: Path, stored: bytes, limit: int) -> bytes:
    """Decompress `stored` to the size the idx header announces, refusing more (a "gzip bomb")
    and announced sizes over `limit`."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        head = inflate.decompress(stored, 4)
        if len(head) == 4:
            head += inflate.decompress(inflate.unconsumed_tail, 4 * head[3])
        size = len(head)
        if len(head) >= 4 and len(head) == 4 + 4 * head[3]:
            size += int(np.prod(struct.unpack(f">{head[3]}I", head[4:]), dtype=np.int64))
        if size > limit:
            raise ValueError(f"{path}: its header announces {size} bytes, more than the "
                             f"{limit} an image file of these data sets may hold")
        body = inflate.decompress(inflate.unconsumed_tail, max(size - len(head), 1))
        if inflate.unconsumed_tail or (not inflate.eof and inflate.decompress(b"", 1)):
            raise ValueError(f"{path} decompresses to more bytes than its header announces "
                             "(corrupt, or not an idx file)")
    except zlib.error as exc:   # truncated or not gzip
        raise ValueError(f"{path} is not a complete gzip file ({exc})") from None
    if not inflate.eof:
        raise ValueError(f"{path} is not a complete gzip file (it ends early)")
    return head + body


def write_idx(path: str | Path, array) -> None:
    """Write a uint8 array as an idx file; gzip-compress it when the name ends in `.gz`."""
    path = Path(path)
    array = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
