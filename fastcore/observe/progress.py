"""Progress as Keras' `fit` shows it: `Epoch N/M`, the step within the epoch, ETA, the current rate, the metrics.

On a terminal one line is redrawn in place (carriage return) at most every TTY_INTERVAL seconds, cut to the
terminal's width (a wrapped line cannot be redrawn): the bar goes first, then whole trailing fields; elsewhere
(a log file, CI) a plain line is printed every NON_TTY_INTERVAL seconds. Each epoch ends with a permanent
line: its step count, wall time (evaluation included), the current rate and every train and eval figure.
The loop reports at compiled-call ends only: with one call per epoch, the terminal line appears when the
call ends (before the evaluation) and a log holds the epoch lines.

The rate is the current one, not the run's average: examples/s and ms/step over the steady calls that
ended in the last WINDOW seconds, timed by the meter (input wait + call); the compiling call, profiled calls
and evaluations are left out. ETA = the epoch's remaining steps x that step time. Between epoch ends the
line shows each step log of the latest call and the train metrics so far; reading them is a host read per
drawn line, not per step.
"""
from __future__ import annotations

import collections
import math
import os
import sys
import time

from fastcore.callbacks import Callback
from fastcore.observe import phases

TTY_INTERVAL = 0.1       # seconds between redraws on a terminal
NON_TTY_INTERVAL = 10.0  # seconds between plain lines elsewhere
WINDOW = 5.0             # seconds of recent calls behind the current rate
BAR = 20


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def figure(name: str, value) -> str:
    return f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"


class Rate:
    """Steps and seconds of the steady calls that ended in the last `window` seconds (at least the latest)."""

    def __init__(self, window: float = WINDOW):
        self.window, self.calls = window, collections.deque()
        self.steps = self.seconds = 0.0

    def add(self, now: float, steps: int, seconds: float) -> None:
        self.calls.append((now, steps, seconds))
        self.steps, self.seconds = self.steps + steps, self.seconds + seconds
        while len(self.calls) > 1 and self.calls[0][0] < now - self.window:
            _, old_steps, old_seconds = self.calls.popleft()
            self.steps, self.seconds = self.steps - old_steps, self.seconds - old_seconds

    def step_seconds(self) -> float | None:
        return self.seconds / self.steps if self.calls and self.seconds > 0 else None


class Progress(Callback):
    """Writes to `out` (default stdout); `live=False` (Keras' verbose=2) keeps to the epoch lines."""

    def __init__(self, out=None, live: bool = True, clock=time.perf_counter):
        self.out = out or sys.stdout
        self.tty = live and _isatty(self.out)
        self.interval = TTY_INTERVAL if self.tty else NON_TTY_INTERVAL if live else math.inf
        self.clock = clock
        self.drawn = False   # a redrawn line is on the terminal, not yet ended

    def on_train_begin(self, loop) -> None:
        self.rate = Rate()
        self.epochs = math.ceil(loop.total_steps / loop.steps_per_epoch)
        self.last_line = self.epoch_start = self.clock()
        self.steady = loop.meter.steady_calls
        # The first call compiles the step (unless the pre-flight did): said if it takes a while.
        self.first_call = phases.begin("the first compiled call")

    def on_epoch_begin(self, loop) -> None:
        self.epoch_start = self.clock()

    def on_call_end(self, loop, logs) -> None:
        if self.first_call:   # once: later calls take no lock
            self.first_call.end()
            self.first_call = None
        now, meter = self.clock(), loop.meter
        if meter.steady_calls > self.steady:   # neither the compiling call nor a profiled one
            self.rate.add(now, loop.steps_per_call, meter.last_wait + meter.last_compute)
        self.steady = meter.steady_calls
        if self.tty and (loop.ending_epoch or now - self.last_line >= self.interval):
            parts, bar = self._parts(loop, logs)
            width = _columns(self.out) - 1   # a wrapped line would not redraw in place
            with_bar = "  ".join([parts[0], f"{parts[1]} {bar}", *parts[2:]])
            self._show(with_bar if len(with_bar) <= width else _fit(parts, width))
        elif not self.tty and not loop.ending_epoch and now - self.last_line >= self.interval:
            self._show("  ".join(self._parts(loop, logs)[0]))
        else:
            return
        self.last_line = now

    def on_epoch_end(self, loop, logs: dict) -> None:
        epoch = max(math.ceil(loop.steps_done / loop.steps_per_epoch), 1)
        done = min(loop.steps_done - (epoch - 1) * loop.steps_per_epoch, loop.steps_per_epoch)
        parts = [f"Epoch {epoch}/{self.epochs}", f"{done}/{loop.steps_per_epoch}",
                 duration(self.clock() - self.epoch_start), *self._rate(loop)]
        parts += [figure(k, v) for k, v in logs.items() if k not in ("epoch", "steps")]
        self._show("  ".join(parts), keep=True)
        self.last_line = self.clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Ends a redrawn line when the run stops inside an epoch, so what follows starts a line of its own."""
        if getattr(self, "first_call", None):
            self.first_call.end("stopped")
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    def _parts(self, loop, logs) -> tuple[list[str], str]:
        """The line's fields and the bar a terminal shows after the first two when it has room."""
        per_epoch = loop.steps_per_epoch
        done = min(loop.steps_done - loop.epoch_index * per_epoch, per_epoch)
        parts = [f"Epoch {loop.epoch_index + 1}/{self.epochs}", f"{done}/{per_epoch}"]
        filled = BAR * done // per_epoch
        bar = "[" + ("=" * filled + (">" if filled < BAR else "")).ljust(BAR) + "]"
        step = self.rate.step_seconds()
        if step is not None:
            parts.append(f"ETA {duration(step * (per_epoch - done))}")
        parts += self._rate(loop)
        figures = {name: float(value) for name, value in logs.items()}
        metrics = getattr(loop.engine.step_fn, "metrics", None)
        if metrics:
            figures.update(metrics.result())
        parts += [figure(k, v) for k, v in figures.items()]
        return parts, bar

    def _rate(self, loop) -> list[str]:
        step = self.rate.step_seconds()
        if step is None:
            return []
        return [f"{loop.batch_size / step:,.0f} ex/s", f"{1000 * step:.2f} ms/step"]

    def _show(self, line: str, keep: bool = False) -> None:
        phases.before_output()
        if self.tty:
            self.out.write("\r" + line + "\x1b[K" + ("\n" if keep else ""))
            self.drawn = not keep
        else:
            self.out.write(line + "\n")
        self.out.flush()


def _fit(parts: list[str], width: int) -> str:
    """The leading fields that fit in `width` (never half a figure)."""
    line = parts[0]
    for part in parts[1:]:
        if len(line) + 2 + len(part) > width:
            break
        line += "  " + part
    return line[:width]


def _columns(stream) -> int:
    """The terminal's width (80 when it does not say)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
