"""A multi-worker call that waits on a stuck worker ends in one line instead of hanging.

A collective waits for every worker. TensorFlow's heartbeat notices a worker that died or stopped (~10 s),
not one that is alive and stuck (a hung input pipeline, a worker on another code path): the others then
wait forever. TensorFlow's per-collective timeout would catch it, but each collective that carries one
starts an OS thread that sleeps out the whole timeout (measured: ~8 threads per step held for
--peer-timeout seconds, thousands on a long run, then an abort). So collectives carry no timeout, and one
thread per process watches the call in flight: when a call has run `seconds` while this process used
almost no CPU (waiting, not computing), it aborts the collectives; the call raises TensorFlow's
UnavailableError, which a run reports as a lost peer (exit 4). Imports TensorFlow only to abort.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time

IDLE_SHARE = 0.05   # under 5% of one core over the window: this process is waiting, not computing


class StallWatch:
    """Aborts this process's collectives when one call waits `seconds` with the process idle."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.aborted: str | None = None
        self._since: float | None = None   # monotonic start of the outermost call in flight
        self._depth = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def call(self):
        with self._lock:
            if self._depth == 0:
                self._since = time.monotonic()
            self._depth += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="fastcore-stall-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._since = None

    def _watch(self) -> None:
        tick = min(1.0, self.seconds / 10)
        samples: collections.deque = collections.deque()   # (monotonic, process CPU seconds)
        while True:
            time.sleep(tick)
            now, cpu = time.monotonic(), time.process_time()
            samples.append((now, cpu))
            while samples and samples[0][0] < now - self.seconds:
                samples.popleft()
            since = self._since
            if since is None or now - since < self.seconds or now - samples[0][0] < 0.9 * self.seconds:
                continue
            if cpu - samples[0][1] < IDLE_SHARE * (now - samples[0][0]):
                self.abort(f"no answer from the other workers for {self.seconds:g} s (--peer-timeout) while this "
                           f"one waited idle: one of them is stuck")
                return

    def abort(self, message: str) -> None:
        from tensorflow.python.eager import context
        from tensorflow.python.framework import errors
        self.aborted = message
        context.context().abort_collective_ops(errors.UNAVAILABLE, message)
