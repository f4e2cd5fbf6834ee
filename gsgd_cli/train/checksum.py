"""A checksum of a checkpoint's contents: SHA-256 over every tensor's dtype, shape and bytes and
every plain value, walked in a fixed order. `save_atomic` stores it in the checkpoint itself
(so it is written atomically with it) and `load` verifies it, so flipped bytes (a weight, the
momentum buffer, the stored iteration) are found before a resumed run trains on them.

It hashes the values, not the file: the file's zip layout may differ between torch versions,
the values may not.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

KEY = "content_sha256"


def digest(state: dict[str, Any]) -> str:
    """The checksum of `state`, without its own `KEY` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != KEY})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:   # e.g. torch.Size, dtype: by their text
        h.update(f"{type(value).__name__}:{value!r};".encode())
