"""`--threads auto`: how many intra-op threads a run uses, chosen by timing the run's own training step.

Small steps lose more to handing work to a second thread than they gain from it. Measured on 2 cores
(float32, XLA): the Fashion-MNIST MLP's step at batch 32 ran 195.6k examples/s on one intra-op thread and
149.9k on both (one reused batch); the HIGGS MLP at batch 500, 26k on one and 43k on both. A proxy (the
step's matmuls alone) picked wrongly for HIGGS (9.3 vs 10.6 ms), so the step itself is timed: the run's
plan is built in two child processes (the thread count is fixed when TensorFlow starts), one on one thread
and one on all, and each times its compiled training call on one batch. The faster wins (one thread only
by a 5% margin) and the answer is cached per machine and run configuration (a few seconds, once). A cached
answer is used only when both times are plausible (PLAUSIBLE_SECONDS per example); else the step is timed
again. The children work in one private temp folder, removed when they end.
Library users set it themselves: tf.config.threading.set_intra_op_parallelism_threads(n) before any op.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

BUDGET_SECONDS = 1.0
MIN_CALLS = 5
MARGIN = 1.05
KEY_VERSION = 2   # bump when what a configuration runs changes (2: auto may run bfloat16 as a plain graph)
PLAUSIBLE_SECONDS = (1e-12, 3600.0)   # per example: a trillion examples/s to one an hour


def use(count: int | None) -> None:
    """Set the intra-op thread count (None: TensorFlow's default, all cores). Before any TensorFlow op."""
    if count is None:
        return
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(count)


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
    count, why = choose(config)
    return count, f"auto: {why}"


def tensorflow_started() -> bool:
    """Whether TensorFlow's runtime exists in this process (then its thread count can no longer change)."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context
    return bool(context.context()._initialized)   # no public flag; set_intra_op_parallelism_threads raises then


def choose(config) -> tuple[int | None, str]:
    """(1 or None, why) for a RunConfig: one thread when the run's step is measurably faster on one."""
    from fastcore.observe import calibrate   # the machine key and its locked cache
    fields = step_cost(config)
    key = cache_key(config)
    entry = calibrate.cached(key)
    cached = _plausible(entry)
    if not cached:
        try:
            with tempfile.TemporaryDirectory(prefix="fastcore-threads-") as scratch:
                entry = {"one": _time_in_child(1, fields, scratch), "all": _time_in_child(0, fields, scratch)}
        except RuntimeError:   # bad data or flags: the run itself reports them in its one line
            return None, "the step could not be timed, so all cores"
        if not _plausible(entry):
            return None, "the step's timing was implausible, so all cores"
        calibrate.store(key, entry)
    one, every = entry["one"], entry["all"]
    pick = 1 if one * MARGIN < every else None
    why = (f"{1 / one:,.0f} examples/s on 1 thread, {1 / every:,.0f} on all, the step timed "
           f"{'earlier (cached)' if cached else 'now'}")
    return pick, why


def step_cost(config) -> dict:
    """The RunConfig fields that change what a step costs (what the timing children rebuild)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("step_cost")}


def cache_key(config) -> str:
    """Where the answer for this configuration is cached (beside the machine's calibration)."""
    return f"threads/v{KEY_VERSION}/" + json.dumps(step_cost(config), sort_keys=True)


def _plausible(entry) -> bool:
    low, high = PLAUSIBLE_SECONDS
    return isinstance(entry, dict) and all(
        isinstance(entry.get(name), float) and low <= entry[name] <= high for name in ("one", "all"))


def _time_in_child(count: int, fields: dict, scratch: str) -> float:
    done = subprocess.run([sys.executable, "-m", "fastcore.cli.threads", str(count), json.dumps(fields), scratch],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"timing the step for --threads auto failed: {done.stderr.strip()[-300:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _seconds_per_example(count: int, fields: dict, scratch: str) -> float:
    """In the child: build the run's plan on `count` threads (0: all) and time its training call."""
    use(count or None)
    import tensorflow as tf

    from fastcore.cli import plan as planning
    config = planning.RunConfig(**fields, logdir=scratch, preflight=False)
    p = planning.plan(config)
    engine = p.trainer.engine   # built by plan()
    batch = next(iter(p.feed.dataset.take(1)))
    train = engine.train_many if p.steps_per_call > 1 else engine.train_one
    tf.nest.map_structure(lambda t: t.numpy(), train(batch))
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - start < BUDGET_SECONDS:
        t = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), train(batch))
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best / (p.batch_size * p.steps_per_call)


if __name__ == "__main__":
    print(json.dumps(_seconds_per_example(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])), flush=True)
