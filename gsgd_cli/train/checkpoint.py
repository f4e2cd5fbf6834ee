"""Checkpoint files: written atomically (temporary file in the same folder, then rename) with a
checksum of their contents, read with torch's restricted unpickler (`weights_only=True`), so
loading one never runs code, and verified against the checksum."""
from __future__ import annotations

import errno
import io
import pickle
import pickletools
import re
from pathlib import Path
from typing import Any

import torch

from gsgd_cli import safe_files

from . import checksum
from gsgd_cli.errors import UserError


class DiskFullError(UserError):
    """No space left (or quota exceeded) while writing a file; the old file is untouched."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` so that `path` is never seen half-written (rename is atomic),
    with the checksum of its contents (`checksum.KEY`) stored in it when `obj` is a dict.

    The object is serialised in memory first, so a full disk shows as the `OSError` of the
    write (`DiskFullError`, one line) rather than as torch's "unexpected pos" error, and the
    previous `path` stays as it was. The file gets the mode of the run's other files (0666
    less the umask, as for `open()`), not `tempfile.mkstemp`'s 0600: see the README's "What is
    trusted". A link at `path` or at the temporary name is never followed (`safe_files`).
    """
    path = Path(path)
    if isinstance(obj, dict):
        obj = {**obj, checksum.KEY: checksum.digest(obj)}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        safe_files.write_atomic(path, buffer.getbuffer(), fsync=True)
    except OSError as exc:
        raise_disk_full(exc, path)
        raise


def raise_disk_full(exc: OSError, path: Path) -> None:
    """A full disk, a quota or the file-size limit while writing `path`: one line."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(f"the disk is full: could not write {path} "
                            f"({exc.strerror or 'no space left'})") from None
    if exc.errno == errno.EFBIG:
        raise DiskFullError(f"could not write {path}: it would pass the file-size limit "
                            "(`ulimit -f`)") from None


def write_text_atomic(text: str, path: str | Path) -> None:
    try:
        safe_files.write_atomic(path, text)
    except OSError as exc:
        raise_disk_full(exc, Path(path))
        raise


# The refusals of torch's restricted unpickler (torch 2.x) that mean "this object is not
# allowed" rather than "these bytes are not a pickle": a global outside the allow-list, a
# class to build or call, a foreign persistent id, or an opcode that builds objects directly
# (INST, OBJ, EXT1/2/4, ...) or any other real pickle instruction it does not run (protocol 0's
# DICT, protocol 4's FRAME: a pickle torch.save does not write). Bytes that are no pickle
# instruction at all are a damaged file.
_REFUSALS = (r"unsupported (?:global: )?GLOBAL ([\w.]+)", r"Can only create new object for [^\n]*? got (.+)",
             r"Can only build [^\n]*?, but got (.+)", r"(\S+) must be imported to load",
             r"call reduce for unrecognized function (.+)", r"(persistent_load[^\n]*)")
_PICKLE_OPCODES = {ord(op.code): op.name for op in pickletools.opcodes}


def refused_object(message: str) -> str | None:
    """What torch's restricted unpickler refused as not allowed (`message` is its error), or
    None when the bytes are simply not a valid pickle."""
    for pattern in _REFUSALS:
        found = re.search(pattern, message, re.IGNORECASE)
        if found:
            return f"e.g. {found.group(1).strip()}"
    opcode = re.search(r"Unsupported operand (\d+)", message)
    if opcode:   # a real pickle instruction the restricted loader does not run (else: garbage)
        name = _PICKLE_OPCODES.get(int(opcode.group(1)))
        if name is not None:
            return f"the pickle instruction {name}, which the restricted loader does not run"
    return None


def append_text(path: str | Path, text: str) -> None:
    """`safe_files.append`, a full disk or the file-size limit as `DiskFullError`."""
    try:
        safe_files.append(path, text)
    except OSError as exc:
        raise_disk_full(exc, Path(path))
        raise


def load(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict, read with torch's restricted unpickler
    (`weights_only=True`: tensors, containers and plain Python values only, never code), its
    checksum verified. A file that cannot be read, that holds other objects, or whose contents
    changed since they were written is one `UserError` line."""
    path = Path(path)
    try:
        with safe_files.open_regular(path) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = refused_object(str(exc))
        if what is not None:
            raise UserError(f"refusing to load {path}: it contains objects that are not allowed "
                            f"in a checkpoint ({what[:160]}); it may run code: do not load it "
                            "unrestricted. A checkpoint written by gsgd train holds only "
                            "tensors and plain values: use one from a source you trust.") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        _corrupt(path, reason.group(1) if reason else exc)
    except safe_files.UnsafeFileError as exc:
        raise UserError(f"cannot read the checkpoint: {exc}.") from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, OverflowError, MemoryError, RecursionError) as exc:
        _corrupt(path, exc)
    if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gsgd train; point "
                        "hydra.run.dir at a run directory, or start again with overwrite=true.")
    stored = state.pop(checksum.KEY, None)
    if stored is not None and stored != checksum.digest(state):
        raise UserError(f"the checkpoint {path} does not match its checksum: its contents "
                        "changed after it was written (a damaged copy or an edit); restore it "
                        "from a copy, or start the run again with overwrite=true.")
    return state


def _corrupt(path: Path, exc: BaseException | str) -> None:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    raise UserError(f"cannot read the checkpoint {path}: the file is corrupt or truncated "
                    f"({reason[:200]}); restore it from a copy, or start the run again "
                    "with overwrite=true.") from None
