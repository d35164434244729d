"""Throughput: steady-state examples/s, step time, share of time waiting for input, compile time.

Timed per compiled call from the host. TensorFlow runs a function call synchronously on the CPU,
so the wall time of a call is its compute time; the first call also traces and compiles.
"""
from __future__ import annotations

import dataclasses
import statistics
import time


@dataclasses.dataclass
class Meter:
    examples_per_call: int
    steps_per_call: int
    wait: list[float] = dataclasses.field(default_factory=list)     # seconds in next(iterator)
    compute: list[float] = dataclasses.field(default_factory=list)  # seconds in the compiled call
    excluded: set[int] = dataclasses.field(default_factory=set)     # calls kept out of steady state (profiled)

    def timed_next(self, iterator):
        start = time.perf_counter()
        batch = next(iterator)
        self.wait.append(time.perf_counter() - start)
        return batch

    def timed_call(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.compute.append(time.perf_counter() - start)
        return out

    @property
    def calls(self) -> int:
        return len(self.compute)

    def report(self) -> dict:
        """Figures for summary.json; the first call (trace + compile) is kept out of steady state."""
        if not self.compute:
            return {}
        # Steady state: every call but the first (trace + compile) and the profiled ones (tracing slows them).
        kept = [i for i in range(1, len(self.compute)) if i not in self.excluded] or range(1, len(self.compute)) or [0]
        steady = [self.compute[i] for i in kept]
        steady_wait = [self.wait[i] for i in kept]
        steady_total = sum(steady) + sum(steady_wait)
        median_call = statistics.median(steady)
        return {
            "examples_per_sec": self.examples_per_call * len(steady) / steady_total,
            "step_time_ms": 1000 * median_call / self.steps_per_call,
            "input_wait_share": sum(steady_wait) / steady_total,
            "compile_seconds": max(self.compute[0] - median_call, 0.0),
            "compiled_calls": self.calls,
            "steady_calls": len(steady),
        }
