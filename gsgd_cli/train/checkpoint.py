"""Checkpoint files: written atomically (temporary file in the same folder, then rename), read
with torch's restricted unpickler (`weights_only=True`), so loading one never runs code."""
from __future__ import annotations

import errno
import io
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


class DiskFullError(UserError):
    """No space left (or quota exceeded) while writing a file; the old file is untouched."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` so that `path` is never seen half-written (rename is atomic).

    The object is serialised in memory first, so a full disk shows as the `OSError` of the
    write (`DiskFullError`, one line) rather than as torch's "unexpected pos" error, and the
    previous `path` stays as it was. The file gets the mode of the run's other files (0666
    less the umask, as for `open()`), not `tempfile.mkstemp`'s 0600: see the README's "What is
    trusted".
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp, fd = _create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk is full: could not write {path} "
                                f"({exc.strerror or 'no space left'})") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_tmp(path: Path) -> tuple[Path, int]:
    """A new `.<name>.<random>.tmp` next to `path`, opened for writing with mode 0666 & ~umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict, read with torch's restricted unpickler
    (`weights_only=True`: tensors, containers and plain Python values only, never code).
    A file that cannot be read, or that holds other objects, is one `UserError` line."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise UserError(f"refusing to load {path}: it contains objects that are not allowed "
                            f"in a checkpoint (e.g. {found.group(1)}), which could run code when "
                            "loaded. A checkpoint written by gsgd train holds only tensors and "
                            "plain values: use one from a source you trust.") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        _corrupt(path, reason.group(1) if reason else exc)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError) as exc:
        _corrupt(path, exc)
    if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gsgd train; point "
                        "hydra.run.dir at a run directory, or start again with overwrite=true.")
    return state


def _corrupt(path: Path, exc: BaseException | str) -> None:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    raise UserError(f"cannot read the checkpoint {path}: the file is corrupt or truncated "
                    f"({reason[:200]}); restore it from a copy, or start the run again "
                    "with overwrite=true.") from None
