"""One writer per run directory: `lock(run_dir)` takes an exclusive `flock` on
`run_dir/.gsgd.lock` for as long as the command works on the run; a second command on the same
directory stops with one line naming the holder's pid. The operating system releases the lock
when the holder exits or is killed, so a killed run never blocks its resume.

The lock file stays empty (the holder's pid comes from /proc/locks), so taking the lock changes
no file of the run; it is not a run file and stays.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from gsgd_cli import safe_files

from gsgd_cli.errors import UserError

LOCK_FILE = ".gsgd.lock"


class RunLock:
    """A held lock; `release()` (or the end of the process) lets the next command in."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self._fd = path, fd
        self.created = created   # this command created the lock file

    def release(self, *, remove_file: bool = False) -> None:
        """Let the next command in; `remove_file`: also delete the lock file (when this
        command created it in a folder it then refused to use as a run directory)."""
        if self._fd is not None:
            if remove_file and self.created:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(self._fd)   # closing the descriptor releases the flock
            self._fd = None


def lock(run_dir: str | Path) -> RunLock:
    """Create `run_dir` if needed and lock it for this process (see the module doc)."""
    run_dir = Path(run_dir)
    safe_files.make_dir(run_dir)
    path = run_dir / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    created = True
    try:
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o666)
        except FileExistsError:
            created = False
            fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; gsgd never writes through a link: "
                            "remove it and run the command again.") from None
        raise
    try:
        safe_files._check_regular(path, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = holder_pid(fd) or "unknown"
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another gsgd command (pid {holder}); wait for "
                        "it to finish or stop it, or choose another hydra.run.dir.") from None
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd, created)


def holder_pid(fd: int) -> str | None:
    """The pid holding a flock on the file open at `fd`, from Linux's /proc/locks (the lock
    file itself is never written, so taking the lock changes nothing in the run directory)."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:   # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return fields[4]
    return None
