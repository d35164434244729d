"""TensorBoard for every run: scalars, a profiler trace of a window of steps, and the run's utilisation.

Everything lands in the run directory (`<logdir>/<run-name>`), laid out as Keras' TensorBoard callback
lays it out, so TensorBoard draws the train and validation curves of one figure on one chart:
  - `train/` and `validation/`: event files (`events.out.tfevents.*`), two runs with the same tag names;
  - `plugins/profile/<session>/<host>.xplane.pb`: the trace of `--profile-steps A:B` (Profile tab).

Scalars, written from tensors the loop already has (no `.numpy()`, so no host sync per step):
  train/batch_<log>            each step log's mean over a compiled call (`batch_loss`...), every
                               `--summary-every` calls and the last
  train/learning_rate          the optimizer's learning rate, same calls
  train/loss_scale             the dynamic loss scale (float16 only), same calls
  train/perf/examples_per_sec  examples of the call / (input wait + call time), of the written calls that count
                               in the steady state: never the first (it traces and compiles) nor a profiled one
  train/perf/step_time_ms      call time / steps per call, same calls
  train/epoch_<name>           once per epoch: the epoch's train_<name> (loss and metrics)
  validation/epoch_<name>      once per epoch: its eval_<name>, the same tag as the train figure
The x axis is the optimizer step (`loop.steps_done`), so K-step calls and resumed runs line up.

Steps are counted from 1: `--profile-steps 2:4` traces the compiled calls that run steps 2, 3 and 4
(with K steps per call, the whole calls that contain them: summary.json's `profile.steps` are the steps
traced, `profile.asked` the steps asked for). A traced call is the run's own compiled K-step call inside
one profiler step marker (`Trace("train", step_num=<first step of the call>, _r=1)`) that spans fetching
its batch and the call, so the Profile tab's step-time and input-pipeline views see the step as the run
runs it; its "step" is one call, and its step time / K is the time per optimizer step (said in the final
line and in `profile.step_time_is`). Traced calls are kept out of the steady-state figures and `perf/*`.
"""
from __future__ import annotations

import collections
import os
import re
import shlex
import statistics

import tensorflow as tf

from fastcore.callbacks import Callback
from fastcore.errors import UsageError
from fastcore.observe import calibrate
from fastcore.observe.meter import RECENT

WINDOW = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_window(text: str, total_steps: int | None = None) -> tuple[int, int]:
    """`A:B` -> (A, B), the first and last step (from 1, inclusive) to trace; raises UsageError."""
    match = WINDOW.match(text or "")
    if not match:
        raise UsageError(f"--profile-steps {text!r} is not A:B: give the first and last step to trace, e.g. 2:4")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last:
        raise UsageError(f"--profile-steps {text}: need 1 <= A <= B (steps count from 1), e.g. 2:4")
    if total_steps is not None and last > total_steps:
        raise UsageError(f"--profile-steps {text} ends after the run's last step ({total_steps}): use B <= {total_steps}")
    return first, last


def check_options(profile_steps: str | None, summary_every: int | None, total_steps: int) -> None:
    """Validate this module's options against the run's length; raises UsageError (one line)."""
    if profile_steps is not None:
        parse_window(profile_steps, total_steps)
    if summary_every is not None and summary_every <= 0:
        raise UsageError(f"--summary-every {summary_every} must be positive (compiled calls between summaries)")


class Scalars(Callback):
    """TensorBoard scalars under `run_dir`'s train/ and validation/; see the module docstring for the tags."""

    def __init__(self, run_dir: str, every: int = 1):
        self.run_dir, self.every = run_dir, max(1, every)
        self.writer = self.validation = None

    def on_train_begin(self, loop) -> None:
        self.writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "train"))
        self.calls, self.steady = 0, loop.meter.steady_calls

    def on_call_end(self, loop, logs) -> None:
        self.calls += 1
        steady = loop.meter.steady_calls > self.steady   # neither the compiling call nor a profiled one
        self.steady = loop.meter.steady_calls
        if self.calls % self.every and loop.steps_done < loop.total_steps:
            return
        optimizers = loop.engine.optimizers
        with self.writer.as_default(step=loop.steps_done):
            for name, value in logs.items():
                tf.summary.scalar(f"batch_{name}", value)
            for name, optimizer in optimizers.items():
                suffix = "" if len(optimizers) == 1 else f"/{name}"
                if hasattr(optimizer, "learning_rate"):
                    tf.summary.scalar(f"learning_rate{suffix}", tf.convert_to_tensor(optimizer.learning_rate))
                if loop.engine.loss_scaling:
                    tf.summary.scalar(f"loss_scale{suffix}", tf.convert_to_tensor(optimizer.dynamic_scale))
            if steady:   # the meter's steady calls only: the compiling call and profiled calls are left out
                meter = loop.meter
                compute, wait = meter.last_compute, meter.last_wait   # host timings of this call, no sync
                tf.summary.scalar("perf/examples_per_sec", meter.examples_per_call / (compute + wait))
                tf.summary.scalar("perf/step_time_ms", 1000 * compute / meter.steps_per_call)

    def on_epoch_end(self, loop, logs: dict) -> None:
        if self.validation is None and any(key.startswith("eval_") for key in logs):   # no empty run without eval
            self.validation = tf.summary.create_file_writer(os.path.join(self.run_dir, "validation"))
        for prefix, writer in (("train_", self.writer), ("eval_", self.validation)):
            if writer is None:
                continue
            with writer.as_default(step=loop.steps_done):
                for key, value in logs.items():
                    if key.startswith(prefix):
                        tf.summary.scalar(f"epoch_{key[len(prefix):]}", value)
            writer.flush()   # TensorBoard sees each epoch as it ends

    def on_train_end(self, loop) -> None:
        for writer in (self.writer, self.validation):
            if writer is not None:
                writer.close()


def profile_sessions(run_dir: str) -> list[str]:
    """Profile session folders (`plugins/profile/<session>`) under a run directory, oldest first."""
    root = os.path.join(run_dir, "plugins", "profile")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


class ProfileWindow(Callback):
    """Profiler trace of the whole compiled calls that run steps first..last (from 1, inclusive).

    Each traced call runs as every other call runs (the same compiled K-step call) inside one profiler step
    marker, numbered by the call's first optimizer step, that spans fetching its batch and the call. So the
    Profile tab's "step" is one call of K steps: its step time / K is the time per optimizer step, and
    `report()` says so. The run's first call traces and compiles: it is left out unless the window starts at
    step 1 (a window that lies wholly inside it traces the next call instead). Traced calls are kept out of
    the meter's steady state and out of the `perf/*` scalars.
    """

    def __init__(self, run_dir: str, first: int, last: int):
        self.run_dir, self.asked = run_dir, (first, last)
        self.first, self.last = first, last   # the window still to trace (moves off the compiling call)
        self.active = self.done = False
        self.trace = None
        self.session_dir: str | None = None
        self.before: set[str] = set()
        self.calls: list[tuple[int, int, float]] = []   # (first step, last step, seconds) of each traced call
        self.steps_per_call, self.examples_per_call = 1, 0
        self.first_call_left_out = False
        self.untraced = collections.deque(maxlen=RECENT)   # seconds (input wait + call) of the steady calls
        self.steady_calls = 0

    def on_train_begin(self, loop) -> None:
        self.steps_per_call, self.examples_per_call = loop.steps_per_call, loop.meter.examples_per_call
        self.steady_calls = loop.meter.steady_calls

    def on_call_begin(self, loop) -> None:
        k = self.steps_per_call
        first_step, last_step = loop.steps_done + 1, loop.steps_done + k
        if loop.meter.calls == 0 and self.first > 1 and first_step <= self.last and last_step >= self.first:
            self.first_call_left_out = True   # it compiles: trace from the next call
            self.first = last_step + 1
            self.last = max(self.last, self.first)
            return
        if not self.active and not self.done and first_step <= self.last and last_step >= self.first:
            self.before = set(profile_sessions(self.run_dir))
            tf.profiler.experimental.start(self.run_dir)
            self.active = True
        if self.active:
            loop.meter.exclude_next_call()
            self.trace = tf.profiler.experimental.Trace("train", step_num=first_step, _r=1)   # starts now

    def on_call_end(self, loop, logs) -> None:
        meter = loop.meter
        if meter.steady_calls > self.steady_calls:   # neither the compiling call nor a traced one
            self.untraced.append(meter.last_wait + meter.last_compute)
        self.steady_calls = meter.steady_calls
        if self.trace is None:
            return
        self.trace.__exit__(None, None, None)
        self.trace = None
        first = loop.steps_done - self.steps_per_call + 1
        self.calls.append((first, loop.steps_done, meter.last_wait + meter.last_compute))
        if loop.steps_done >= self.last:
            self.stop()

    def on_train_end(self, loop) -> None:
        if self.active:
            self.stop()

    def stop(self) -> None:
        if self.trace is not None:   # a run stopped inside a call: its marker ends with the trace
            self.trace.__exit__(None, None, None)
            self.trace = None
        tf.profiler.experimental.stop()
        self.active, self.done = False, True
        new = [d for d in profile_sessions(self.run_dir) if d not in self.before]
        self.session_dir = new[-1] if new else None

    def report(self) -> dict:
        """summary.json's `profile`: the steps asked for and the steps traced (whole calls), one marker per call,
        the per-step time derived from the traced calls (their host time, as the markers span it: input wait and
        call, / K) and the untraced steady step over the same span, so what tracing itself costs is in view."""
        k, asked = self.steps_per_call, list(self.asked)
        out = {"asked": asked, "steps": asked, "dir": self.session_dir, "calls": len(self.calls),
               "steps_per_call": k, "markers": [first for first, _, _ in self.calls], "traced_steps": []}
        if self.first_call_left_out:
            out["first_call_left_out"] = True
        if not self.calls:
            return out
        call_ms = 1000 * statistics.median(seconds for _, _, seconds in self.calls)
        # the Profile tab's Overview shows the mean: one slow call moves it, not the median (7 calls: 14.7 ms
        # against a median of 12.2 once, in a loaded test run)
        call_ms_mean = 1000 * statistics.fmean(seconds for _, _, seconds in self.calls)
        out.update(steps=[self.calls[0][0], self.calls[-1][1]],
                   traced_steps=[step for first, last, _ in self.calls for step in range(first, last + 1)],
                   call_ms=call_ms, call_ms_mean=call_ms_mean, step_time_ms=call_ms / k, examples_per_sec=1000 * self.examples_per_call / call_ms,
                   step_time_is=f"the Profile tab's step is one compiled call of {k} step{'s' if k > 1 else ''} "
                                f"(one marker per call, spanning its input wait and the call): its step time / {k} "
                                f"is the time per optimizer step")
        if self.untraced:   # the untraced steady step, input wait included as in a marker (medians both)
            out["steady_step_ms"] = 1000 * statistics.median(self.untraced) / k
            out["tracing_cost"] = out["step_time_ms"] / out["steady_step_ms"]
        return out


class Observer:
    """A run's TensorBoard callbacks, and its utilisation / trace report for summary.json."""

    def __init__(self, run_dir: str, view_dir: str, profile_steps: str | None = None, summary_every: int | None = None):
        self.run_dir, self.view_dir = run_dir, view_dir
        self.scalars = Scalars(run_dir, summary_every or 1)
        self.window = ProfileWindow(run_dir, *parse_window(profile_steps)) if profile_steps else None

    @property
    def callbacks(self) -> list[Callback]:
        return [self.window, self.scalars] if self.window else [self.scalars]

    def report(self, ledger, mode: str, summary: dict) -> dict:
        """Fields for summary.json: where the scalars and trace are, the trace ledger."""
        view = f"tensorboard --logdir {shlex.quote(self.view_dir)}"
        retraces, counts = ledger.retraces(), ledger.counts()
        out = {
            "retraced": bool(retraces), "retraces": retraces,
            # XLA compiles each trace of a jit_compile function once for its (fixed) input shapes; the
            # runtime's own counter (/tensorflow/core/xla_compilations) is not readable from Python.
            "xla_compilations": counts if mode == "xla" else {name: 0 for name in counts},
            "scalars": {"dir": self.run_dir, "view": view},
        }
        if self.window:
            out["profile"] = {**self.window.report(), "view": f"{view}  (Profile tab)"}
        return out


def utilisation(flops_per_example: float | None, examples_per_sec: float, dtype: str,
                step_shapes: list = (), measure: bool = True) -> dict:
    """Achieved FLOP/s against the machine's ceiling for the run's dtype (fastcore.observe.calibrate):
    never above 100%; a run that beats the ceiling says the ceiling was measured low."""
    if not flops_per_example:
        return {}
    achieved = flops_per_example * examples_per_sec / 1e9
    try:   # a cached ceiling below what the run achieved is measured again
        top = calibrate.ceiling(dtype, list(step_shapes), measure=measure, achieved=achieved)
    except (calibrate.Unavailable, UsageError) as e:   # no trustworthy ceiling: no figure rather than a wrong one
        return {"utilisation_left_out": str(e)}
    out = {"achieved_gflops": achieved, "utilisation": min(achieved / top["gflops"], 1.0),
           "peak": {**top, "dtype": dtype, "threads": calibrate.threads(), "cache": calibrate.cache_path(),
                    "measured_by": f"best of XLA and oneDNN {dtype} matmuls at {calibrate.LARGE}^3 and the step's "
                                   f"largest, all threads"}}
    if achieved > top["gflops"]:
        out["peak"]["measured_low"] = True   # a neighbour slowed the calibration: python -m fastcore.profile calibrate
    return out


def final_lines(summary: dict) -> list[str]:
    """The run's closing lines (after examples/s): utilisation, traces, where to look in TensorBoard."""
    lines = []
    if "utilisation" in summary:
        peak = summary["peak"]
        lines.append(f"utilisation {100 * summary['utilisation']:.0f}%: {summary['achieved_gflops']:,.1f} GFLOP/s "
                     f"({summary['flops_per_example'] / 1e6:.2f} MFLOP/example) of {peak['gflops']:,.0f} GFLOP/s "
                     f"peak ({peak['dtype']} {peak['path']} matmul {peak['shape']}, best of XLA and oneDNN, "
                     f"{peak.get('status') or ('cached' if peak['cached'] else 'measured now')}"
                     f"{'; measured low: recalibrate' if peak.get('measured_low') else ''}); "
                     f"step {summary['step_time_ms']:.2f} ms")
    if "traces" in summary:
        traces = ", ".join(f"{k} {v}" for k, v in summary["traces"].items())
        compiles = ", ".join(f"{k} {v}" for k, v in summary.get("xla_compilations", {}).items())
        lines.append(f"traces: {traces}; XLA compilations: {compiles}; "
                     f"{'RETRACED (see stderr)' if summary.get('retraced') else 'no retrace'}")
    if "scalars" in summary:
        lines.append(f"scalars: {summary['scalars']['dir']}  view: {summary['scalars']['view']}")
    if "profile" in summary:
        prof = summary["profile"]
        a, b = prof["steps"]
        if prof["dir"] and prof.get("calls"):
            lines.append(f"profile of steps {a}-{b}{_traced_why(prof)}: {prof['dir']}  view: {prof['view']}")
            lines.append(profile_step_line(prof))
        elif prof["dir"]:
            lines.append(f"profile: {prof['dir']}  view: {prof['view']}")
        else:
            lines.append(f"profile of steps {a}-{b}: not written (the run did not execute those steps)")
    return lines


def _traced_why(prof: dict) -> str:
    """Why the steps traced differ from the steps asked for (whole calls; the compiling call left out)."""
    (a, b), (first, last), k = prof["asked"], prof["steps"], prof["steps_per_call"]
    if (a, b) == (first, last):
        return ""
    why = ["the first call compiles and is left out (1:B includes it)"] if prof.get("first_call_left_out") else []
    if k > 1 and (first < a or last > b):
        why.append(f"whole calls of {k} steps")
    if last < b:
        why.append(f"the run stopped after step {last}")
    return f" (asked {a}-{b}: {'; '.join(why)})"


def profile_step_line(prof: dict) -> str:
    """How to read the Profile tab's step time: one marker per compiled call, so per step is its time / K."""
    k, calls = prof["steps_per_call"], prof["calls"]
    steady = (f"; untraced steady {prof['steady_step_ms']:.3f} ms per step: tracing costs {prof['tracing_cost']:.2f}x"
              if "steady_step_ms" in prof else "")
    return (f"profile: {calls} call{'s' if calls > 1 else ''} traced as the run runs them, one step marker per call: "
            f"the Profile tab's step is one call of {k} step{'s' if k > 1 else ''}, so per step = its step time / {k} "
            f"(traced: {prof['call_ms']:.2f} ms per call, {prof['step_time_ms']:.3f} ms per step, input wait "
            f"included{steady})")


def retrace_warning(summary: dict) -> str | None:
    """The loud stderr line for a run whose compiled functions traced more than once."""
    if not summary.get("retraced"):
        return None
    return ("fastcore-train: WARNING: RETRACED (each retrace re-compiles; the steady-state figures include it): "
            + " | ".join(summary["retraces"]))
