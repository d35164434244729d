"""What keeps a run directory sound: one writer at a time, and SIGINT/SIGTERM as a normal way to stop.

`RunLock` holds an OS file lock (fcntl.flock on `<dir>/.lock`) for the whole run: a second run on the
same directory is refused in one line, and a killed run leaves no stuck lock (the kernel drops a dead
process's locks). The lock file is never opened through a symbolic link (fastcore.atomic.open_private).

`StopSignals` turns SIGINT and SIGTERM (what Ctrl-C, schedulers and preemption send) into a request the
loop honours after the compiled call in flight: it saves a checkpoint, writes summary.json marked
interrupted, and stops with one line. A second signal stops at once (exit 128 + signal number), saying
which checkpoint is on disk. A signal that arrives after the loop's last call (during the report) is
delivered to the previous handler when the run ends, not dropped (a Signalled it raises is marked
`after_last_step`: training is complete).

`raise_on_signals` is the command line's handler outside a loop (start-up, verify, calibration): the
signal raises `Signalled`, which the command turns into one line and 130 / 143.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
from collections.abc import Callable

from fastcore import atomic
from fastcore.errors import UsageError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunLock:
    """An exclusive lock on a folder (created if missing) for as long as the run holds it."""

    def __init__(self, folder: str, what: str = "run directory"):
        self.folder, self.what, self.fd = folder, what, None

    def __enter__(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = atomic.open_private(os.path.join(self.folder, ".lock"), f"the {self.what}'s lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.what} {self.folder!r} is in use by another run ({holder}): wait for it to "
                             f"end, or choose another --run-name / run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the lock
            self.fd = None


class StopSignals:
    """Records SIGINT/SIGTERM while a run is in progress (main thread only; elsewhere a no-op).

    `latest_checkpoint`: set by the run, () -> the newest checkpoint on disk or None, so a second signal
    says what is true."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}
        self.latest_checkpoint: Callable[[], str | None] = lambda: None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        installed, self.previous = bool(self.previous), {}
        if installed and exc_type is None and self.received is not None:
            try:
                signal.raise_signal(self.received)   # arrived after the last call: the previous handler decides
            except Signalled as e:
                e.after_last_step = True
                raise

    def _handle(self, signum, frame) -> None:
        if self.received is not None:   # the second signal: stop now
            latest = self.latest_checkpoint()
            state = f"the last checkpoint, {latest!r}, is intact" if latest else "no checkpoint had been written"
            sys.stderr.write(f"fastcore: stopped at once by a second {signal.Signals(signum).name}; {state}\n")
            sys.stderr.flush()
            os._exit(EXIT_CODES.get(signum, 128 + signum))
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None


class Signalled(BaseException):
    """SIGINT or SIGTERM outside a training loop in a command (not an Exception: nothing may swallow it).
    `after_last_step`: it arrived during a run's report, after its last compiled call (see StopSignals)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.name, self.exit_code = signal.Signals(signum).name, EXIT_CODES[signum]
        self.after_last_step = False


def raise_on_signals() -> None:
    """For a command's main thread: SIGINT and SIGTERM raise Signalled where they arrive; a second one
    while the first unwinds stops at once."""
    def handle(signum, frame):
        for sig in EXIT_CODES:
            signal.signal(sig, stop_now)
        raise Signalled(signum)

    def stop_now(signum, frame):
        sys.stderr.write(f"fastcore: stopped at once by a second {signal.Signals(signum).name}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODES[signum])

    for sig in EXIT_CODES:
        signal.signal(sig, handle)
