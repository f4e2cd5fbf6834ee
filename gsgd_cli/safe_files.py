"""Reading and writing files in folders that other people may have prepared (run directories,
report and figure outputs) without following a link, blocking on a special file or reading
without end.

* `read_bytes(path, limit)`: a regular file only (no symbolic link, FIFO or device), at most
  `limit` bytes; never blocks (opened with `O_NONBLOCK`). Data files may be read through a
  link (`follow_links=True`), still from a regular file only.
* `write_atomic(path, data)`: a new temporary file next to `path`, created exclusively (a link
  planted under its name is never followed), renamed over `path`; refuses when `path` is a
  link or not a regular file. A failed write leaves `path` as it was and no temporary file.
* `append(path, text)`: appends to a regular file (created when missing), never through a link.
* `remove(path)`: deletes a file, a link (the link itself) or a folder tree, never what a link
  points to.
* `links_among(folder, names)`: the names in `folder` that are symbolic links.

Every refusal is an `UnsafeFileError` (an `OSError`) whose message is one line naming the file.
This module uses only the standard library, so every layer of gsgd can use it.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

MiB = 1 << 20


class UnsafeFileError(OSError):
    """A file gsgd will not read or write as it is (a link, a special file, too large)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(errno.EPERM, f"{path} {reason}")
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def is_link(path: str | Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_regular(path: Path, fd: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(path, f"is {_kind(info.st_mode)}, not a regular file")
    return info


def _open_read(path: Path, follow_links: bool = False) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(path, "is a symbolic link; gsgd reads only the files "
                                  "themselves: replace the link by the file") from None
        raise


def read_bytes(path: str | Path, limit: int, *, follow_links: bool = False) -> bytes:
    """The contents of the regular file `path`, refused when larger than `limit` bytes.
    `follow_links=True` reads through a link (data folders are often linked) but still only
    from a regular file."""
    path = Path(path)
    fd = _open_read(path, follow_links)
    try:
        info = _check_regular(path, fd)
        if info.st_size > limit:
            raise UnsafeFileError(path, f"is {info.st_size} bytes, more than the {limit} bytes "
                                  "such a file may hold")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(MiB, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:   # the file grew while being read
                raise UnsafeFileError(path, f"holds more than the {limit} bytes such a file "
                                      "may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int) -> str:
    """`read_bytes` decoded as UTF-8 (`UnicodeDecodeError` on other bytes)."""
    return read_bytes(path, limit).decode("utf-8")


def check_writable_target(path: str | Path) -> None:
    """Refuse to replace `path` when it is a link or exists as something other than a file."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFileError(path, "is a symbolic link; gsgd never writes through a link: "
                              "remove the link (or write elsewhere)")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(path, f"is {_kind(info.st_mode)}, not a regular file; move it "
                              "away (or write elsewhere)")


def _create_tmp(path: Path) -> tuple[Path, int]:
    """A new `.<name>.<random>.tmp` next to `path`, created exclusively (O_EXCL never follows a
    link), mode 0666 less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"could not create a temporary file next to {path}")


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace `path` by `data` in one rename (readers see the old or the new file, never half
    of one); the temporary file is removed on any failure. `fsync=True` also waits until the
    data are on the disk before the rename (checkpoints)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    check_writable_target(path)
    tmp, fd = _create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def append(path: str | Path, text: str) -> None:
    """Append `text` to the regular file `path` (created when missing), never through a link."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(path, "is a symbolic link; gsgd never writes through a link: "
                                  "remove the link") from None
        raise
    with os.fdopen(fd, "ab") as f:
        _check_regular(path, f.fileno())
        f.write(text.encode("utf-8"))


def remove(path: str | Path) -> None:
    """Delete `path`: a link itself (never its target), a file, or a folder tree (links inside
    it are removed as links)."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)   # does not follow links inside the tree
    else:
        os.unlink(path)


def make_dir(path: str | Path) -> None:
    """`mkdir -p path`, refusing when `path` itself is a link or not a folder."""
    path = Path(path)
    if is_link(path):
        raise UnsafeFileError(path, "is a symbolic link; gsgd never writes through a link: "
                              "remove the link")
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise UnsafeFileError(path, "is not a directory")


def links_among(folder: str | Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """The names in `folder` that are symbolic links."""
    return [name for name in names if is_link(Path(folder) / name)]


def open_regular(path: str | Path):
    """`path` opened for reading in binary mode, when it is a regular file and not a link."""
    path = Path(path)
    fd = _open_read(path)
    try:
        _check_regular(path, fd)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def write_all_or_none(files: dict[Path, bytes | str], limit: int = 16 * MiB) -> None:
    """`write_atomic` each of `files`; when one fails, those already written get their old
    contents back (or are removed when they did not exist), as far as the disk allows."""
    old: dict[Path, bytes | None] = {}
    for path in files:
        try:
            old[path] = read_bytes(path, limit)
        except FileNotFoundError:
            old[path] = None
    done = []
    try:
        for path, data in files.items():
            write_atomic(path, data)
            done.append(path)
    except BaseException:
        for path in done:
            try:
                remove(path) if old[path] is None else write_atomic(path, old[path])
            except OSError:
                pass
        raise
