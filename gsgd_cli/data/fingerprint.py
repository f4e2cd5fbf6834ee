"""What data files a run read: the name, size and SHA-256 of each, noted by the readers as they
read the bytes (so each file is hashed once, at load). `gsgd train` stores the fingerprint in
the run (summary and checkpoint) and refuses to resume a run on different data behind
`data.root`, naming the file.

    with collect() as files:
        data = load_data(cfg.data)
    files  # {"train-images-idx3-ubyte.gz": [size, sha256], ...}

Files are keyed by name, not path: moving the data folder (`data.root` may change on resume)
keeps the fingerprint.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

from gsgd_cli.errors import UserError

_active: list[dict[str, list]] = []


def note(path: str | Path, raw: bytes) -> None:
    """`path` was read and held `raw` (its bytes as stored on disk)."""
    if _active:
        _active[-1][Path(path).name] = [len(raw), hashlib.sha256(raw).hexdigest()]


@contextlib.contextmanager
def collect() -> Iterator[dict[str, list]]:
    files: dict[str, list] = {}
    _active.append(files)
    try:
        yield files
    finally:
        _active.pop()


def differences(recorded: dict | None, current: dict) -> list[str]:
    """The files whose size or hash differs (or that only one side read), sorted by name."""
    if recorded is None:
        return []   # a run from before fingerprints: nothing to compare
    if not isinstance(recorded, dict):
        return ["(the recorded fingerprint is damaged)"]
    return sorted(name for name in set(recorded) | set(current)
                  if list(recorded.get(name) or []) != list(current.get(name) or []))


def check_same(run_dir: str | Path, recorded: dict | None, current: dict) -> None:
    """Refuse (one `UserError` line) to resume a run on other data than it trained on."""
    changed = differences(recorded, current)
    if changed:
        raise UserError(f"cannot resume {run_dir}: the data differ from those the run trained "
                        f"on ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}: "
                        "another size or content); resume with the original data files behind "
                        "data.root.")
