"""Pre-flight: before training, the compiled step and its eager twin must agree on the first batch.

XLA miscompiles some real models silently (compiled and eager differ by whole units, no error). Before
the first training step, one batch's losses and gradients are computed by the step function compiled
the way training compiles it and eagerly, from the same state, and compared tensor by tensor. The step
runs with `ctx.training=False` (the built-in loss step calls the model in inference mode), so a model's
own randomness (dropout) cannot raise a false alarm, and nothing is applied: no weight changes. Any RNG
state the step advances is put back, and random numbers the step draws are the same on both paths
(fastcore.engine.twin_random). A tensor over the tolerance passes within the model's own float32 spread
(fastcore.engine.rounding). Cost: one extra compile of the one-step forward+backward and one
eager step (reported as `preflight.seconds`). `verify` remains the full N-step check with updates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf

from fastcore.errors import FastcoreError, PreflightError, UsageError, no_gradient

from fastcore.engine import rounding, twin_random
from fastcore.engine.verify import UNREPEATABLE, SavedState

# Relative tolerance per compute dtype: max |compiled - eager| / max |eager| per tensor. Measured on the
# built-in tasks and examples here (one step, inference mode): float32 <= 2e-6 (the Keras VAE example
# 1.7e-5); bfloat16 (XLA's bf16 x bf16 -> f32 dot against the eager bf16 matmul) up to ~2e-2; float16 up
# to ~3e-3. A miscompile is whole units.
TOLERANCE = {"float32": rounding.RTOL, "bfloat16": 1e-1, "float16": 1e-1}


@dataclasses.dataclass
class PreflightReport:
    passed: bool
    precision: str
    seconds: float
    tolerance: float
    differences: list[tuple[str, float, float]]   # (tensor, max abs diff, max rel diff)
    extra_seconds: float | None = None   # wall time beyond the training compile it overlapped (if it did)
    warm_up_seconds: float | None = None   # the training call's compile and first run, when it overlapped
    judgement: rounding.Judgement | None = None   # the failing tensors, and the model's own spread if measured

    @property
    def worst(self) -> tuple[str, float, float]:
        return max(self.differences, key=lambda d: d[2]) if self.differences else ("none", 0.0, 0.0)

    def line(self) -> str:
        name, max_abs, max_rel = self.worst
        if self.passed:
            cost = (f"{self.extra_seconds:.2f} s beside compiling the training step" if self.extra_seconds is not None
                    else f"{self.seconds:.2f} s")
            return (f"pre-flight: compiled and eager agree on the first batch ({len(self.differences)} tensors, "
                    f"worst relative difference {max_rel:.1e} in {name}; {cost})")
        if self.judgement.unrepeatable:
            name, moved = self.judgement.unrepeatable
            return (f"pre-flight: the eager step does not repeat itself from the same state ({name} moved by "
                    f"{moved:.3g}), so compiled and eager cannot be compared: {UNREPEATABLE}; opt out with "
                    f"preflight=False / --no-preflight")
        bad = [d for d in self.differences if d[0] in self.judgement.failing]
        shown = "; ".join(f"{n} differs by {r:.2g} relative ({a:.3g} absolute, {self.judgement.ratio(n):.3g}x "
                          f"its own float32 spread)" for n, a, r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return (f"pre-flight: the compiled step disagrees with its eager twin on the first batch, "
                f"{self.precision} tolerance {self.tolerance:g}: {shown}{more}; not training "
                f"(a miscompile; opt out with preflight=False / --no-preflight)")

    def to_json(self) -> dict:
        name, max_abs, max_rel = self.worst
        return {"passed": self.passed, "precision": self.precision, "seconds": round(self.seconds, 3),
                "extra_seconds": None if self.extra_seconds is None else round(self.extra_seconds, 3),
                "tolerance": self.tolerance, "tensors": len(self.differences),
                "worst": {"tensor": name, "max_abs": max_abs, "max_rel": max_rel},
                "own_spread_measured": self.judgement is not None and self.judgement.spread is not None}


def outputs(engine, batch) -> dict:
    """The step's losses and gradients for `batch` in inference mode, by name; applies nothing."""
    out = {}
    for phase in range(len(engine.phases)):   # every phase from the same weights (nothing is applied here)
        logs, grads = engine.compute(batch, training=False, phase=phase)
        for optimizer, pairs in grads.items():
            if not pairs:   # every gradient None (dropped by the engine): nothing would ever train
                raise no_gradient(optimizer)
        out.update({f"loss {name}": value for name, value in logs.items()})
        several = len(grads) > 1 or len(engine.phases) > 1
        for optimizer, pairs in grads.items():
            for g, v in pairs:
                values = tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                label = f"gradient {optimizer + ':' if several else ''}{getattr(v, 'path', None) or v.name}"
                if label in out:   # unnamed tf.Variables all share the name 'Variable:0'
                    label += f" #{sum(1 for k in out if k.startswith(label))}"
                out[label] = values
    return out


def run(engine, first_call, k: int, precision: str, overlap: bool) -> PreflightReport:
    """The pre-flight as fit runs it: `check` on the first batch of `first_call` (an element of the feed: K
    stacked batches when k > 1), and with `overlap` the training call compiled meanwhile on `first_call` with
    updates off (it applies nothing and counts no step); raises PreflightError (its one line) on a disagreement."""
    batch = tf.nest.map_structure(lambda t: t[0], first_call) if k > 1 else first_call
    seconds = {}

    def warm_up():
        train_fn = engine.train_many if k > 1 else engine.train_one
        engine.updates_on.assign(False)
        try:
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), train_fn(first_call))
            seconds["warm_up"] = time.perf_counter() - start
        finally:
            engine.updates_on.assign(True)
    with native_log_held():
        try:
            report = check(engine, batch, precision, warm_up if overlap else None)
        except tf.errors.InvalidArgumentError as e:
            ops = sorted(set(re.findall(r"No registered '(\w+)' OpKernel for XLA", str(e))))
            if not ops:
                raise
            raise UsageError(f"XLA cannot compile the step: it uses {', '.join(ops)}, which XLA has no kernel for: "
                             f"train with mode='graph', or take the operation out of the step") from None
    report.warm_up_seconds = seconds.get("warm_up")
    if report.warm_up_seconds:   # the training compile it overlapped would have happened anyway
        report.extra_seconds = max(report.seconds - report.warm_up_seconds, 0.0)
    if not report.passed:
        raise PreflightError(report.line(), report)
    return report


@contextlib.contextmanager
def native_log_held():
    """Hold what TensorFlow's C++ runtime writes to file descriptor 2 meanwhile: a failed op (an XLA compile
    of a step that cannot compile) is logged there with its Python creation stack, 25-46 lines, from
    whichever thread ran it (the pre-flight's helper thread too). Dropped when the block ends in a fastcore
    error, whose one line says it; written out otherwise."""
    try:
        held = tempfile.TemporaryFile()
    except OSError:   # no usable temp folder: nothing is held
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    keep = True
    try:
        yield
    except FastcoreError:
        keep = False
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        text = held.read() if keep else b""
        held.close()
        if text:
            os.write(2, text)


def check(engine, batch, precision: str, warm_up=None) -> PreflightReport:
    """Compare the compiled and eager losses and gradients of one step on `batch` (see module docstring).

    `warm_up`, if given, runs on this thread while the pre-flight's own compile runs on another (two XLA
    compiles on two cores at once): the training call, compiled and run with updates disabled, so the
    pre-flight costs little more than its eager step. Measured (HIGGS, 2 cores): pre-flight alone
    0.52 s, overlapped with the training compile 0.13 s of extra wall time.
    Overlapping is safe only under XLA. The warm-up's forward pass moves BatchNormalization's moving
    statistics (and RNG states) before the engine puts them back (a step not applied changes no model
    variable), and the pre-flight's inference pass reads those statistics. An XLA call writes its variables
    only when it ends, so the concurrent pre-flight sees them as they were; a plain graph runs op by op and
    would expose the moved values (measured: a BN convnet's pre-flight failed at 1.5e-4 beside a graph-mode
    warm-up; at 0.54 (a conv kernel's gradient) in a second fit, beside an XLA warm-up that did not put them back).
    So in graph mode the warm-up runs after the pre-flight's compiled pass.
    """
    start = time.perf_counter()
    compiled_fn = tf.function(lambda b: outputs(engine, b), jit_compile=engine.mode == "xla", autograph=False)
    state = SavedState(engine, twin_random.touched_variables(compiled_fn.get_concrete_function(batch)))
    if warm_up is None or engine.mode != "xla":
        compiled = _arrays(compiled_fn(batch))
        if warm_up is not None:
            warm_up()
    else:
        box: dict = {}

        def run():
            try:
                box["out"] = compiled_fn(batch)
            except BaseException as e:   # noqa: BLE001 (raised again on the caller's thread, below)
                box["error"] = e
        worker = threading.Thread(target=run, name="fastcore-preflight")
        worker.start()
        try:
            warm_up()
        finally:
            worker.join()
        if "error" in box:   # a bad step or batch says so in its own words, not as a thread's traceback
            raise box["error"]
        compiled = _arrays(box["out"])
        if state.extra:   # a variable no model holds (a SeedGenerator in the step's closure) the warm-up
            state.restore()   # may have moved before that run read it: run again (compiled by now)
            compiled = _arrays(compiled_fn(batch))
    state.restore()
    eager = _arrays(outputs(engine, batch))
    state.restore()

    def rerun(pattern):
        rounding.nudge(engine, pattern)
        try:
            return _arrays(outputs(engine, batch))
        finally:
            state.restore()
    tolerance = TOLERANCE[precision]
    judgement = rounding.judge(compiled, eager, rerun, tolerance)
    differences = [(name, a, r) for name, (a, r) in judgement.differences.items()]
    return PreflightReport(judgement.passed, precision, time.perf_counter() - start, tolerance, differences,
                           judgement=judgement)


def _arrays(tensors: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in tensors.items()}

