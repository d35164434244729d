"""Throughput: steady-state examples/s, step time, share of time waiting for input, compile time.

Timed per compiled call from the host. TensorFlow runs a function call synchronously on the CPU,
so the wall time of a call is its compute time; the first call also traces and compiles.
Memory stays flat however long the run: running sums, and the last `RECENT` call times for the median.
"""
from __future__ import annotations

import collections
import statistics
import time

RECENT = 4096


class Meter:
    def __init__(self, examples_per_call: int, steps_per_call: int):
        self.examples_per_call, self.steps_per_call = examples_per_call, steps_per_call
        self.calls = 0
        self.first_call = 0.0                       # trace + compile + run of call 0
        self.last_wait = self.last_compute = 0.0    # the latest call's timings (for per-call scalars)
        self.steady_calls, self.steady_wait, self.steady_compute = 0, 0.0, 0.0
        self.recent = collections.deque(maxlen=RECENT)
        self._exclude_next = False

    def exclude_next_call(self) -> None:
        """Keep the next call out of steady state (a profiled call runs slower)."""
        self._exclude_next = True

    def timed_next(self, iterator):
        start = time.perf_counter()
        batch = next(iterator)
        self.last_wait = time.perf_counter() - start
        return batch

    def timed_call(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.last_compute = time.perf_counter() - start
        if self.calls == 0:
            self.first_call = self.last_compute + self.last_wait
        elif not self._exclude_next:
            self.steady_calls += 1
            self.steady_wait += self.last_wait
            self.steady_compute += self.last_compute
            self.recent.append(self.last_compute)
        self.calls += 1
        self._exclude_next = False
        return out

    def report(self) -> dict:
        """Figures for summary.json; with no steady-state call yet, only what is known."""
        if not self.steady_calls:
            return {"compiled_calls": self.calls, "steady_calls": 0, "first_call_seconds": self.first_call}
        total = self.steady_wait + self.steady_compute
        median_call = statistics.median(self.recent)
        return {
            "examples_per_sec": self.examples_per_call * self.steady_calls / total,
            "step_time_ms": 1000 * median_call / self.steps_per_call,
            "input_wait_share": self.steady_wait / total,
            "compile_seconds": max(self.first_call - median_call, 0.0),
            "compiled_calls": self.calls,
            "steady_calls": self.steady_calls,
        }
