"""Say what a run is doing while it does something slow, so a terminal or a log never sits silent.

A phase (data preparation, timing threads or precisions, verify, the pre-flight, compiling, the report) is
announced once it has run ANNOUNCE_AFTER seconds and timed when it ends; a phase that ends sooner prints
nothing, so a cached decision costs no line. Before this, a fresh README run showed 111.6 s of an empty
screen. On a terminal the end is written on the announcing line (`... 3.2 s`); elsewhere (a log file, a pipe)
each is a line of its own. Nothing is said unless a caller speaks: the CLI for its whole run, `Trainer.fit`
when verbose.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time

ANNOUNCE_AFTER = 1.0   # seconds: a phase this short is not worth a line

_lock = threading.RLock()
_out = None            # where phases speak (None: silent)
_open = None           # the phase whose announcing line is open on a terminal
_stopped = None        # the innermost phase an exception (a signal) ended, for the stop's one line


@contextlib.contextmanager
def speaking(out=None):
    """Phases inside speak to `out` (default stdout); an outer `speaking` keeps its stream."""
    global _out
    if _out is not None:
        yield
        return
    _out = out or sys.stdout
    try:
        yield
    finally:
        _out = None


def start_line(text: str) -> None:
    """Say `text ...` now, whatever the delay: the run's first line, before TensorFlow starts."""
    if _out is not None:
        _Phase(text, _out, 0.0)._announce()


class _Phase:
    def __init__(self, text: str, out, delay: float, own_line: bool = False):
        self.text, self.out, self.note = text, out, ""
        self.tty = _isatty(out) and not own_line
        self.announced = self.ended = False
        self.start = time.perf_counter()
        self.timer = threading.Timer(delay, self._announce) if delay > 0 else None

    def _announce(self) -> None:
        global _open
        with _lock:
            if self.ended or self.announced:
                return
            _break_open_line()
            self.announced = True
            self.out.write(f"{self.text} ..." + ("" if self.tty else "\n"))
            self.out.flush()
            if self.tty:
                _open = self

    def end(self, outcome: str | None = None) -> None:
        """Time the phase (only if it was announced); `outcome` replaces the time, e.g. 'stopped'."""
        global _open
        if self.timer:
            self.timer.cancel()
        with _lock:
            if self.ended:   # once only
                return
            self.ended = True
            if not self.announced:
                return
            tail = outcome or f"{time.perf_counter() - self.start:.1f} s" + (f" ({self.note})" if self.note else "")
            if _open is self:
                self.out.write(f" {tail}\n")
                _open = None
            else:
                _break_open_line()
                self.out.write(f"{self.text}: {tail}\n")
            self.out.flush()


def begin(text: str, delay: float = ANNOUNCE_AFTER, own_line: bool = False) -> _Phase:
    """A phase that starts now and is announced if it has not ended (`.end()`) within `delay` seconds.
    `own_line`: end the announcing line at once, also on a terminal (the work draws progress of its own)."""
    p = _Phase(text, _out, delay if _out is not None else 0.0, own_line)
    if _out is None:
        p.ended = True   # silent: nothing to announce or time
    elif p.timer:
        p.timer.daemon = True
        p.timer.start()
    else:
        p._announce()
    return p


@contextlib.contextmanager
def phase(text: str, delay: float = ANNOUNCE_AFTER, own_line: bool = False):
    """Announce `text` if the block runs longer than `delay` seconds, and time it; yields the phase, whose
    `.note` is added to the closing time."""
    global _stopped
    p = begin(text, delay, own_line)
    try:
        yield p
    except BaseException:
        p.end("stopped")
        _stopped = _stopped or text
        raise
    p.end()


def stopped_in() -> str | None:
    """The phase the latest error or signal stopped (the innermost), e.g. for `stopped by SIGINT during ...`."""
    return _stopped


def before_output() -> None:
    """Call before writing a line of one's own while a phase may hold an open terminal line."""
    with _lock:
        _break_open_line()


def _break_open_line() -> None:
    global _open
    if _open is not None:
        _open.out.write("\n")
        _open.out.flush()
        _open = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
