"""`--threads auto`: how many intra-op threads a run uses, chosen by timing the run's own training step.

Small steps lose more to handing work to a second thread than they gain from it. Measured on 2 cores
(float32, XLA): the Fashion-MNIST MLP's step at batch 32 ran 195.6k examples/s on one intra-op thread and
149.9k on both (one reused batch); the HIGGS MLP at batch 500, 26k on one and 43k on both. A proxy (the
step's matmuls alone) picked wrongly for HIGGS (9.3 vs 10.6 ms), so the step itself is timed: the run's
plan is built in two child processes (the thread count is fixed when TensorFlow starts), one on one thread
and one on all, and each times its compiled training call on one batch. The faster wins (one thread only
by a 5% margin) and the answer is cached per machine and run configuration. Budget, measured on a 2-core
Xeon for the HIGGS task: 25.8 s on a machine's first run (16.4 s of it the machine's matmul peaks, which the
precision choice needs anyway and every later configuration reuses), about 10 s per child for a new
configuration, 0 s once cached. Against a neighbour's load, the rules every auto decision follows
(fastcore.observe.timing): each child times its call for fastcore.threads.BUDGET_SECONDS and keeps the fastest repeat; when
the timing judges itself noisy (its two fastest over timing.SPREAD apart, or other work on the CPUs) the
answer is used but not cached; after the run, a steady rate
(input wait left out) under timing.AGREE's lower bound of the cached one forgets the cached answer (recheck).
A cached answer is used only when both times are plausible (fastcore.threads.PLAUSIBLE_SECONDS per example); else the step is
timed again. The children work in one private temp folder, removed when they end.
Library users have the same choice for their own step: fastcore.threads.choose(main).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

from fastcore import children
from fastcore.observe import calibrate, phases, timing   # no TensorFlow: both are safe before threads are set
from fastcore.threads import (Implausible, cached_or_timed, plausible, seconds_per_example, tensorflow_started,
                              use, verdict)

KEY_VERSION = 2   # bump when what a configuration runs changes (2: auto may run bfloat16 as a plain graph)

__all__ = ["choose", "decide", "recheck", "use"]


def decide(setting: str, config) -> tuple[int | None, str]:
    """The thread count for `--threads` (auto | all | N) and why; (None, why) keeps TensorFlow's default."""
    if setting == "all":
        return None, "all cores (--threads all)"
    if setting != "auto":
        return int(setting), f"--threads {setting}"
    if tensorflow_started():
        return None, "all cores (TensorFlow had already started in this process)"
    if config.strategy != "none" or config.mode == "eager":
        return None, "all cores (auto times single-device compiled steps only)"
    before = resumed_count(config) if config.resume else None
    if before is not None:   # a resumed run keeps its arithmetic: --deterministic's bit-identical end needs it
        return before or None, f"auto: {before or 'all'}, as this run used before it was stopped (summary.json)"
    count, why = choose(config)
    return count, f"auto: {why}"


def resumed_count(config) -> int | None:
    """The intra-op thread count the run being resumed used (0: all cores), from its summary.json; None if
    unknown (no summary.json yet, e.g. after a SIGKILL: then it is timed or read from the cache)."""
    from fastcore.cli import plan as planning
    try:
        with open(os.path.join(planning.run_dir(config), "summary.json"), encoding="utf-8") as f:
            used = json.load(f).get("intra_op_threads")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(used, int) or used <= 0:
        return None
    return 0 if used == len(os.sched_getaffinity(0)) else used


def choose(config) -> tuple[int | None, str]:
    """(1 or None, why) for a RunConfig: one thread when the run's step is measurably faster on one."""
    fields = step_cost(config)

    def time_both():
        with tempfile.TemporaryDirectory(prefix="fastcore-threads-") as scratch, phases.phase(
                "--threads auto: timing the step on 1 thread and on all, one child process each"):
            return {"one": _time_in_child(1, fields, scratch), "all": _time_in_child(0, fields, scratch)}
    try:
        return verdict(*cached_or_timed(cache_key(config), time_both))
    except Implausible:
        return None, "the step's timing was implausible, so all cores"
    except RuntimeError:   # bad data or flags: the run itself reports them in its one line
        return None, "the step could not be timed, so all cores"


def recheck(config, count: int | None, examples_per_sec: float | None) -> str | None:
    """After a run: when its steady rate (`examples_per_sec` of compute, input wait left out) is far below
    what the cached timing promised for its thread count
    (a timing taken under a neighbour's load, or a changed machine), forget the cached answer so the next run
    times it again; returns the line saying so, else None. Costs nothing now."""
    entry = calibrate.cached(cache_key(config))
    if not examples_per_sec or not plausible(entry):
        return None
    promised = 1 / entry["one" if count == 1 else "all"]
    low = timing.AGREE[0]
    if examples_per_sec >= low * promised:
        return None
    calibrate.forget(cache_key(config))
    return (f"threads: this run's {examples_per_sec:,.0f} examples/s is under {low:.0%} of the "
            f"{promised:,.0f} timed earlier; the next run times the thread count again")


def step_cost(config) -> dict:
    """The RunConfig fields that change what a step costs (what the timing children rebuild)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("step_cost")}


def cache_key(config) -> str:
    """Where the answer for this configuration is cached (beside the machine's calibration)."""
    return f"threads/v{KEY_VERSION}/" + json.dumps(step_cost(config), sort_keys=True)


def _time_in_child(count: int, fields: dict, scratch: str) -> tuple[float, str | None]:
    """(fastest seconds per example of the run's training call on `count` threads (0: all), why that timing is
    noisy or None: fastcore.observe.timing's verdict, repeats apart or other work on the CPUs)."""
    done = children.run([sys.executable, "-m", "fastcore.cli.threads", str(count), json.dumps(fields), scratch],
                        timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"timing the step for --threads auto failed: {done.stderr.strip()[-300:]}")
    best, noise = json.loads(done.stdout.strip().splitlines()[-1])
    return float(best), noise


def _seconds_per_example(count: int, fields: dict, scratch: str) -> tuple[float, str | None]:
    """In the child: build the run's plan on `count` threads (0: all) and time its training call."""
    use(count or None)
    from fastcore.cli import plan as planning
    config = planning.RunConfig(**fields, logdir=scratch, preflight=False)
    p = planning.plan(config)
    return seconds_per_example(p.trainer.engine, p.feed, p.steps_per_call)   # the engine built by plan()


if __name__ == "__main__":
    print(json.dumps(_seconds_per_example(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])), flush=True)
