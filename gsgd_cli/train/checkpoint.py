"""Atomic checkpoint files: write to a temporary file in the same folder, then rename."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` so that `path` is never seen half-written (rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict; a file that cannot be read is one `UserError` line."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError,
            pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the checkpoint {path}: the file is corrupt or truncated "
                        f"({reason[:200]}); restore it from a copy, or start the run again "
                        "with overwrite=true.") from None
    if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gsgd train; point "
                        "hydra.run.dir at a run directory, or start again with overwrite=true.")
    return state
