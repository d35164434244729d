"""Progress display: a redrawn bar on a terminal, one line per epoch everywhere."""
from __future__ import annotations

import sys
import time

from fastcore.callbacks import Callback


def format_logs(logs: dict) -> str:
    """`epoch 3  steps 750  train_loss 0.3120 ...`: epochs as counted (fractional when calls span epochs)."""
    return "  ".join(f"{k} {v:g}" if k == "epoch" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in logs.items())


class Progress(Callback):
    """Redraws at most every `interval` seconds; reads the loss only then (no per-step host sync)."""

    def __init__(self, out=None, bar_stream=None, interval: float = 0.2, width: int = 30):
        self.out = out or sys.stdout
        self.bar_stream = bar_stream if bar_stream is not None else sys.stderr
        self.live = self.bar_stream.isatty()
        self.interval, self.width = interval, width
        self.last_draw = 0.0

    def on_train_begin(self, loop) -> None:
        self.start = time.perf_counter()
        self.first_call_end = None

    def on_call_end(self, loop, logs) -> None:
        now = time.perf_counter()
        if self.first_call_end is None:
            self.first_call_end, self.steps_at_first = now, loop.steps_done
            return
        if not self.live or now - self.last_draw < self.interval:
            return
        self.last_draw = now
        done = loop.steps_done / loop.total_steps
        filled = int(self.width * done)
        rate = (loop.steps_done - self.steps_at_first) * loop.batch_size / (now - self.first_call_end)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        self.bar_stream.write(f"\repoch {loop.epoch:6.2f} [{bar}] {100 * done:3.0f}%  "
                              f"{rate:,.0f} ex/s  " + "  ".join(f"{k} {float(v):.4f}" for k, v in logs.items()) + " ")
        self.bar_stream.flush()

    def on_epoch_end(self, loop, logs: dict) -> None:
        if self.live:
            self.bar_stream.write("\r\033[K")
        print(format_logs(logs), file=self.out, flush=True)
