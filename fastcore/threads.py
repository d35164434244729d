"""How many intra-op threads a library user's process trains on, chosen by timing the user's own step.

Small steps lose more to handing work to a second thread than they gain from it, and TensorFlow fixes its
thread count when its runtime starts, before any model exists. So the choice is made first, in children:

    import fastcore.threads

    def main():                      # a module-level function that builds a Trainer and calls fit
        ...
        trainer.fit(x, y, batch_size=32, epochs=5)

    if __name__ == "__main__":
        print(fastcore.threads.choose(main).why)
        main()

`choose(main)` runs `main` in two child processes, one on one intra-op thread and one on all. In each, the
first `Trainer.fit` builds its step as usual (its `mode="auto"` and precision choices included), times its
compiled training call on its first batch for BUDGET_SECONDS, keeps the fastest repeat and ends the child:
nothing is trained, checkpointed or written. The faster count (one thread only by MARGIN) is then set in
this process, before TensorFlow starts here. The children import `main`'s module as multiprocessing's spawn
does: its `if __name__ == "__main__":` block does not run there. The answer is cached per machine, per
source of `main`'s file and per command-line arguments (`refresh=True` times again; a cached time outside
PLAUSIBLE_SECONDS is timed again); a timing that judges itself noisy (other work on the
CPUs, repeats apart: fastcore.observe.timing) is used but not cached. The CLI's `--threads auto` is the same
choice for the built-in tasks (fastcore.cli.threads).
Measured (2-core Xeon, float32, XLA): the MNIST MLP's step at batch 32 ran 195.6k examples/s on one thread
and 149.9k on both; the HIGGS MLP's at batch 500, 26k on one and 43k on both: no fixed rule fits both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import runpy
import sys
from collections.abc import Callable

from fastcore import children
from fastcore.errors import UsageError
from fastcore.observe import calibrate, phases, timing   # no TensorFlow: safe before the threads are set

BUDGET_SECONDS = 1.0
MIN_CALLS = 5
MARGIN = 1.05
TIMEOUT_SECONDS = 900
PLAUSIBLE_SECONDS = (1e-12, 3600.0)   # per example: a trillion examples/s to one an hour
_ANSWER = "fastcore-threads-answer "   # the child's result line, after whatever `main` printed
_PROBE = "FASTCORE_THREADS_PROBE"      # set in a child: its first fit times its step and ends the child


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """count: intra-op threads set (None: TensorFlow's default, every core); why: one line saying so."""
    count: int | None
    why: str


def use(count: int | None) -> None:
    """Set the intra-op thread count (None: TensorFlow's default, all cores). Before any TensorFlow op."""
    if count is None:
        return
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(count)


def tensorflow_started() -> bool:
    """Whether TensorFlow's runtime exists in this process (then its thread count can no longer change)."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context
    return bool(context.context()._initialized)   # no public flag; set_intra_op_parallelism_threads raises then


def pick(one: float, every: float) -> int | None:
    """1 when one thread's seconds per example beat all cores' by MARGIN, else None (all cores)."""
    return 1 if one * MARGIN < every else None


def verdict(entry: dict, cached: bool, noisy: list) -> tuple[int | None, str]:
    """(the count, why) from timed seconds per example {"one": ..., "all": ...}: the one rule both the CLI's
    --threads auto and choose() follow."""
    count = pick(entry["one"], entry["all"])
    return count, (f"{1 / entry['one']:,.0f} examples/s on 1 thread, {1 / entry['all']:,.0f} on all, the step "
                   f"timed {'earlier (cached)' if cached else 'now'}{', noisy, not cached' if noisy else ''}")


def seconds_per_example(engine, feed, steps_per_call: int) -> tuple[float, str | None]:
    """(the fastest seconds per example of `engine`'s training call on `feed`'s first batch, fastcore.observe.
    timing's noise verdict or None): what a timing child measures."""
    import tensorflow as tf
    batch = next(iter(feed.dataset.take(1)))
    train = engine.train_many if steps_per_call > 1 else engine.train_one
    timed = timing.interleaved({"step": lambda: tf.nest.map_structure(lambda t: t.numpy(), train(batch))},
                               budget=BUDGET_SECONDS, least=MIN_CALLS, most=1000)
    return timed.seconds["step"] / (feed.batch_size * steps_per_call), timed.noise


def choose(main: Callable[[], object], refresh: bool = False, verbose: bool = True) -> ThreadChoice:
    """Time `main`'s first fit on one intra-op thread and on all (a child process each), set the faster in this
    process and say why. Call it before any TensorFlow op; `main` is a module-level function taking no
    arguments. A main that cannot be timed (it raises, or ends without calling fit) leaves every core in use.
    refresh: time again though an answer is cached. verbose: announce the timing on stdout when it runs
    over a second (fastcore.observe.phases)."""
    target = _target(main)
    if tensorflow_started():
        return ThreadChoice(None, "all cores: TensorFlow had already started in this process (choose before any op)")
    def time_both():
        with phases.speaking() if verbose else contextlib.nullcontext(), phases.phase(
                "threads: timing the step on 1 thread and on all, one child process each"):
            return {"one": _time_in_child(1, target), "all": _time_in_child(0, target)}
    try:
        entry, cached, noisy = cached_or_timed(cache_key(target), time_both, refresh)
    except Implausible:
        return ThreadChoice(None, "all cores: the step's timing was implausible")
    except RuntimeError as failed:
        return ThreadChoice(None, f"all cores: {failed}")
    count, why = verdict(entry, cached, noisy)
    use(count)
    return ThreadChoice(count, f"{'1 thread' if count else 'all cores'}: {why}")


class Implausible(RuntimeError):
    """A fresh timing outside PLAUSIBLE_SECONDS: neither used nor cached."""


def cached_or_timed(key: str, time_both: Callable[[], dict], refresh: bool = False) -> tuple[dict, bool, list]:
    """(entry {"one": s, "all": s} seconds per example, whether it came from the cache, the names timed noisily)
    for the answer under `key`: the cached one when plausible (and not `refresh`), else `time_both()`'s
    ({"one": (seconds, noise or None), "all": ...}), cached unless noisy. The rule both choose() and the CLI's
    --threads auto follow. Raises RuntimeError when the step cannot be timed, Implausible when its timing is
    absurd."""
    entry = None if refresh else calibrate.cached(key)
    if plausible(entry):
        return entry, True, []
    timed = time_both()
    entry = {name: seconds for name, (seconds, _) in timed.items()}
    if not plausible(entry):
        raise Implausible(f"{entry}")
    noisy = [name for name, (_, noise) in timed.items() if noise]
    if not noisy:
        calibrate.store(key, entry)
    return entry, False, noisy


def cache_key(target: dict) -> str:
    """Where choose's answer for `main` (as _target found it) and this script's arguments is cached."""
    return (f"threads/library/{target['file'] or target['module']}:{target['name']}:{target['source']}:"
            f"{json.dumps(sys.argv[1:])}")


def plausible(entry) -> bool:
    """A cached answer whose two times (seconds per example on one thread and on all) are numbers a step can
    take: a damaged or absurd entry is timed again, not trusted."""
    low, high = PLAUSIBLE_SECONDS
    return isinstance(entry, dict) and all(
        isinstance(entry.get(name), float) and low <= entry[name] <= high for name in ("one", "all"))


def _target(main) -> dict:
    """Where a child finds `main`: its module (or, for a script's __main__, its file) and qualified name."""
    name = getattr(main, "__qualname__", "")
    module = getattr(main, "__module__", None)
    if not callable(main) or not module or "<" in name:
        raise UsageError(f"threads.choose needs a module-level function (the children import it); got {main!r}")
    file = None
    if module == "__main__":
        file = getattr(sys.modules["__main__"], "__file__", None)
        if not file:
            raise UsageError("threads.choose: main is defined in an interactive session; put it in a file")
        file = os.path.abspath(file)
    try:
        source = hashlib.sha256(inspect.getsource(sys.modules[module]).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        source = "unknown"
    return {"module": module, "file": file, "name": name, "source": source, "argv": sys.argv}


def _time_in_child(count: int, target: dict) -> tuple[float, str | None]:
    """(fastest seconds per example of main's training call on `count` threads (0: all), noise or None).
    The child sees this process's import path (a script's folder included)."""
    env = {**os.environ, _PROBE: "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = children.run([sys.executable, "-m", "fastcore.threads", str(count), json.dumps(target)],
                        timeout=TIMEOUT_SECONDS, env=env)
    answers = [line[len(_ANSWER):] for line in done.stdout.splitlines() if line.startswith(_ANSWER)]
    if done.returncode != 0 or not answers:
        last = (done.stderr.strip().splitlines() or ["it ended without calling Trainer.fit"])[-1]
        raise RuntimeError(f"main's step could not be timed on {count or 'all'} thread(s): {last[:300]}")
    seconds, noise = json.loads(answers[-1])
    return float(seconds), noise


def probing() -> bool:
    """Whether this process is a child of choose(): then its first fit times its step and ends here."""
    return os.environ.get(_PROBE) == "1"


def answer(engine, feed, steps_per_call: int) -> None:
    """In a child: time the training call `fit` built on its first batch, print the answer, end the process
    (nothing of the run is written)."""
    print(_ANSWER + json.dumps(seconds_per_example(engine, feed, steps_per_call)), flush=True)
    sys.stderr.flush()
    os._exit(0)


def _child(count: int, target: dict) -> None:
    """Run main on `count` threads (0: all) with the parent's sys.argv (as multiprocessing's spawn does: a
    script reading its arguments reads the same); its first fit ends this process (answer)."""
    use(count or None)
    sys.argv = target["argv"]
    first, *rest = target["name"].split(".")
    if target["file"]:
        main = runpy.run_path(target["file"], run_name="__fastcore_threads__")[first]
    else:
        main = getattr(importlib.import_module(target["module"]), first)
    for part in rest:
        main = getattr(main, part)
    main()


if __name__ == "__main__":
    _child(int(sys.argv[1]), json.loads(sys.argv[2]))
