"""SIGINT (Ctrl-C) and SIGTERM (what SLURM and submitit send before a time limit or a
preemption) stop a run the same way: at the end of the current iteration, with a checkpoint.

`StopRequests.install()` (the trainer, around its loop): the first signal only sets `signum`,
which the loop checks once per iteration; a second one raises `Interrupted` at once.
`raise_on_sigterm()` (the CLI, outside the loop): SIGTERM raises `Interrupted` like Ctrl-C
raises `KeyboardInterrupt`. Exit code 128 + the signal number (130, 143), as a shell reports.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Received:
    """The first stop signal this process got (a worker of a sweep remembers it, so that the
    jobs queued on it do not start; the sweep's main process exits with its code)."""

    signum: int | None = None


received = _Received()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; a `KeyboardInterrupt`, so Ctrl-C paths handle it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def exit_code(exc: BaseException) -> int:
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopRequests:
    """Signal handlers that ask the training loop to stop; `uninstall()` restores the old ones."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, extra: tuple[int, ...] = ()) -> "StopRequests":
        """Handle SIGINT, SIGTERM and the `extra` signals (submitit's preemption signal in a
        submitit job, `preemption.preemption_signal()`)."""
        stop = cls()
        if _in_main_thread():   # only the main thread may set handlers; elsewhere: no-op
            for sig in (*SIGNALS, *extra):
                stop._previous[sig] = signal.signal(sig, stop._handle)
        return stop

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:   # asked twice: stop now, without a new checkpoint
            raise Interrupted(signum)
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def raise_on_sigterm() -> Any:
    """Make SIGTERM raise `Interrupted` (as SIGINT raises `KeyboardInterrupt`); returns the
    previous handler (None outside the main thread, where nothing is changed)."""
    if not _in_main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def wait_for_workers_on_signal(say) -> None:
    """For a sweep whose jobs run in other processes (joblib, submitit): the first SIGINT or
    SIGTERM only says (`say`) that the jobs are stopping (they get the signal too: terminals,
    SLURM and `kill -- -PGID` signal the whole group) and lets them finish their checkpoints;
    aborting the pool at once could kill a worker mid-checkpoint. A second signal raises
    `Interrupted` at once."""
    if not _in_main_thread():
        return
    asked: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if asked:
            raise Interrupted(signum)
        asked.append(signum)
        received.signum = received.signum or signum
        say(f"gsgd train: {signal.Signals(signum).name}: waiting for the running jobs, which "
            "stop at the end of their current iteration with a checkpoint when they get the "
            "signal too; signal again to stop at once")

    for sig in SIGNALS:
        signal.signal(sig, handler)
