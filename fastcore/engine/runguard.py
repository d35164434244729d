"""What keeps a run directory sound: one writer at a time, and SIGINT/SIGTERM as a normal way to stop.

`RunLock` holds an OS file lock (fcntl.flock on `<dir>/.lock`) for the whole run: a second run on the
same directory is refused in one line, and a killed run leaves no stuck lock (the kernel drops a dead
process's locks).

`StopSignals` turns SIGINT and SIGTERM (what Ctrl-C, schedulers and preemption send) into a request the
loop honours after the compiled call in flight: it saves a checkpoint, writes summary.json marked
interrupted, and stops with one line. A second signal stops at once (exit 128 + signal number).
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading

from fastcore.errors import UsageError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunLock:
    """An exclusive lock on a folder (created if missing) for as long as the run holds it."""

    def __init__(self, folder: str, what: str = "run directory"):
        self.folder, self.what, self.handle = folder, what, None

    def __enter__(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, ".lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"{self.what} {self.folder!r} is in use by another run ({holder}): wait for it to "
                             f"end, or choose another --run-name / run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()   # closing drops the lock
            self.handle = None


class StopSignals:
    """Records SIGINT/SIGTERM while a run is in progress (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:   # the second signal: stop now
            sys.stderr.write(f"fastcore: stopped at once by a second {signal.Signals(signum).name}; "
                             f"the last checkpoint is intact\n")
            sys.stderr.flush()
            os._exit(EXIT_CODES.get(signum, 128 + signum))
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None
