"""Timing candidates on a shared machine: interleaved repeats, the fastest of several, and whether to trust it.

A neighbour's load comes and goes: timing every repeat of A before any of B lets a burst land on one
candidate, and that slow figure then decides. So candidates are timed in rounds, A B A B ... (after one call
each that compiles, and one that sizes the repeats), and each keeps its fastest repeat (load only ever slows a
call down). Every candidate's repeat lasts about as long as the longest call (at least REPEAT_SECONDS): a
short call runs several times in a row. The fastest of several short windows is a luckier draw than the
fastest of as many long ones, and an unequal race picked the wrong path: the BN convnet's graph/1 (40 ms
calls) timed 3,204 ex/s against graph/52's 2,827 (0.5 s calls), where the zoo's rounds of 0.5 s each read
2,366 and 2,683.
The timing judges itself noisy when
  - a candidate's two fastest repeats lie more than SPREAD apart (a neighbour came and went), or
  - other processes (and a hypervisor's steal) kept more than BUSY of the CPUs this process may use busy
    meanwhile (Linux /proc/stat; a steady neighbour slows every repeat alike and leaves no spread).
A noisy timing is used by the run that measured it and never cached: the next run measures again.
A cached timing is checked against the run that used it: the run's own steady step (the median compiled
call, input waits left out) is the same call timed for longer; outside AGREE of the cached rate, one of them
was measured under load, and the cached figure is no longer trusted (`contradicts`).
A candidate `behind` times slower than the fastest leaves the race after a round: it cannot win, so its
noise decides nothing. Rounds stop after `budget` seconds, once each candidate has `least` repeats.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

SPREAD = 0.25          # the two fastest repeats of a candidate within 25% (a quiet 2-core VM: 11-17%)
BUSY = 0.10            # other work on at most 10% of this process's CPUs while timing
REPEAT_SECONDS = 0.02  # a repeat runs for about the longest call, and at least about this long
AGREE = (0.5, 1.5)     # a run's own steady rate within this factor of a cached timing's agrees with it


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: dict[str, float]   # each candidate's fastest call, in seconds
    spread: dict[str, float]    # second-fastest / fastest - 1 (inf when timed once)
    racing: tuple[str, ...]     # the candidates timed to the end (the others fell `behind`)
    rounds: int
    busy: float | None          # share of this process's CPUs other work took meanwhile (None: unknown)

    @property
    def noise(self) -> str | None:
        """Why this timing is not to be trusted (nor cached), in a few words; None when it is quiet."""
        spread = {name: self.spread[name] for name in self.racing}
        worst = max(spread, key=spread.get) if spread else None
        if worst is not None and spread[worst] > SPREAD:
            apart = "timed once" if math.isinf(spread[worst]) else f"repeats {100 * spread[worst]:.0f}% apart"
            return f"{worst} {apart}"
        if self.busy is not None and self.busy > BUSY:
            return f"other work took {100 * self.busy:.0f}% of the CPUs"
        return None

    def rates(self, work: dict[str, float]) -> dict[str, float]:
        """{candidate: work per second} (examples/s, FLOP/s) from the work one call does."""
        return {name: work[name] / seconds for name, seconds in self.seconds.items()}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def time_call(fn: Callable[[], object], times: int = 1) -> float:
    """Seconds per call of `fn` over `times` calls in a row (the one function that reads the clock)."""
    start = time.perf_counter()
    for _ in range(times):
        fn()
    return (time.perf_counter() - start) / times


def interleaved(calls: dict[str, Callable[[], object]], budget: float, least: int = 3, most: int = 8,
                behind: float = math.inf, work: dict[str, float] | None = None) -> Timing:
    """Warm each call up once (it compiles), then time them in rounds A B A B ...: see the module docstring.
    `work`: what one call of each does (examples), when they differ: `behind` compares time per unit of it."""
    for fn in calls.values():
        fn()
    before = machine_cpu()
    probe = {name: time_call(fn) for name, fn in calls.items()}   # sizes the repeats, keeps no figure
    window = max(REPEAT_SECONDS, *probe.values())
    times = {name: max(1, round(window / max(seconds, 1e-9))) for name, seconds in probe.items()}
    timed = {name: [] for name in calls}
    racing = list(calls)
    rounds, rounds_start = 0, time.perf_counter()
    while rounds < most and not (rounds >= least and time.perf_counter() - rounds_start > budget):
        if rounds:
            per_unit = {name: min(timed[name]) / (work[name] if work else 1) for name in racing}
            racing = [name for name in racing if per_unit[name] <= behind * min(per_unit.values())]
        for name in racing:
            timed[name].append(time_call(calls[name], times[name]))
        rounds += 1
    spread = {name: (sorted(t)[1] / sorted(t)[0] - 1 if len(t) > 1 else math.inf) for name, t in timed.items()}
    return Timing({name: min(t) for name, t in timed.items()}, spread, tuple(racing), rounds,
                  busy_share(before, machine_cpu()))


def machine_cpu() -> tuple[float, float, float] | None:
    """(CPU seconds the CPUs this process may use were busy, this process's CPU seconds, wall clock), or
    None where /proc/stat cannot be read (not Linux)."""
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or (allowed is not None and name not in allowed):
                    continue
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                busy += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return None
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def busy_share(before, after) -> float | None:
    """The share of this process's CPUs that other work kept busy between two machine_cpu() readings."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (after[2] - before[2]) / cpus)


def run_rate(summary: dict) -> float | None:
    """A finished run's own steady examples/s per compiled call, input waits left out (None: too short a run)."""
    step_ms, batch = summary.get("step_time_ms"), summary.get("batch_size")
    return batch * 1000 / step_ms if step_ms and batch else None


def contradicts(cached_rate: float, run_rate: float) -> bool:
    """Whether a run's own steady rate disagrees with the cached timing of the same call (see AGREE)."""
    low, high = AGREE
    return not low * cached_rate <= run_rate <= high * cached_rate
