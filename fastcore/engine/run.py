"""One training run: locks, signals, the pre-flight, the loop with its callbacks, and how it ends.

Takes plain values (the built engine, the feed, options): nothing here knows the Trainer. Every way a run
can end is one outcome: finished (the summary), a non-finite step (NonFiniteError), a signal (Interrupted,
after a checkpoint), a lost peer (PeerLost); each writes summary.json first when there is a run folder.
A NaN/Inf figure that stops nothing (a diagnostic log, an evaluation) is said in a warning line.

Counting: steps are the engine's optimizer steps, over every fit of one engine. A fit trains its length
(epochs or steps) from where the engine is, and numbers its checkpoints by that count (ckpt-N holds step
N); a resumed fit's length counts from step 0 of the run in its checkpoint folder, so the same count
tells it how far that run got.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from fastcore import atomic, distribute
from fastcore.callbacks import Callback
from fastcore.engine import checkpoint, feeding, input_checks, report, runguard
from fastcore.engine.loop import Loop, NonFiniteLoss, StopRequested
from fastcore.errors import DataError, Interrupted, NonFiniteError, PeerLost, UsageError
from fastcore.observe import phases, tensorboard
from fastcore.observe.progress import Progress
from fastcore.options import FitOptions, identity_fields


@dataclasses.dataclass
class FitResult:
    """What `Trainer.fit` returns: per-epoch history (train_<name>, eval_<name>) and the run's summary."""
    history: list[dict]
    summary: dict
    run_dir: str | None


class FigureWarnings(Callback):
    """One warning line for an epoch whose figures the loop found NaN/Inf (its logs' `non_finite`): the
    run goes on (they are no loss or gradient of a step), and the figure is never passed off as normal."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn

    def on_epoch_end(self, loop, logs: dict) -> None:
        names = logs.get("non_finite")
        if not names:
            return
        losses = {f"train_{name}" for name in loop.engine.loss_names}
        causes = []
        if any(n in losses for n in names):
            causes.append("no step of the epoch was applied")
        if any(n.startswith("train_") and n not in losses for n in names):
            causes.append("a metric or log of the step, not its loss or gradients: training goes on")
        if any(n.startswith("eval_") for n in names):
            causes.append("labels the loss cannot take, or NaN/Inf in the validation data or weights")
        self.warn(f"epoch {logs['epoch']:g}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} NaN/Inf "
                  f"({'; '.join(causes)}); the history marks {'it' if len(names) == 1 else 'them'} (non_finite)")


@dataclasses.dataclass
class Run:
    """A built engine and its data, ready to train under `options`."""
    engine: object                 # fastcore.engine.step.Engine (or DistributedEngine)
    feed: feeding.Feed
    k: int                         # steps per compiled call
    precision: object              # fastcore.engine.precision.Precision
    mode: str                      # the compiled path that runs
    options: FitOptions
    mode_reason: str = "requested"   # why that path (mode="auto": what was timed)
    evaluation: tf.data.Dataset | None = None
    strategy: object = None
    identity_records: tuple = ()   # option records whose IDENTITY fields make the run this run
    preflight: Callable | None = None        # (first call's batch) -> PreflightReport; raises PreflightError
    warm_up_seconds: Callable[[], float | None] = lambda: None
    rechecks: Sequence[Callable[[dict], str | None]] = ()   # (summary) -> a cached auto decision it contradicts

    def total_steps(self, start: int = 0) -> int:
        """The step the fit ends at: `start` (where the engine is) plus its length, in whole calls of K."""
        o = self.options
        length = o.steps if o.steps is not None else o.epochs * self.feed.steps_per_epoch
        return start + math.ceil(length / self.k) * self.k

    def fit(self, callbacks: Sequence[Callback] = ()) -> FitResult:
        o, engine, feed = self.options, self.engine, self.feed
        chief = distribute.is_chief(self.strategy)
        # The chief's checkpoint folder: every worker restores from it (storage all workers can read).
        checkpoint_dir = o.checkpoint_folder
        run_dir, verbose = (o.run_dir, o.verbose) if chief else (None, False)
        if not chief:   # a multi-worker run's other workers train alongside and write nothing of their own
            callbacks = ()
        resuming = bool(o.resume and checkpoint_dir and checkpoint.on_disk(checkpoint_dir))
        start = 0 if resuming else int(engine.steps.numpy())   # a second fit goes on from the engine's step
        total = self.total_steps(start)
        tensorboard.check_options(o.profile_steps, o.summary_every, total)
        for name, folder in (("run_dir", run_dir), ("checkpoint_dir", checkpoint_dir)):
            atomic.check_writable(name, folder)
        if o.deterministic:
            tf.config.experimental.enable_op_determinism()
        engine.first_non_finite_step.assign(-1)   # a new fit starts healthy: no bad update was ever applied
        out = o.out or sys.stdout
        say = (lambda line: print(line, file=out, flush=True)) if verbose else (lambda line: None)
        if self.mode_reason != "requested":
            say(f"compiled path {self.mode_reason}")
        summary = {**(o.summary_head or {}), "precision": self.precision.name,
                   "precision_reason": self.precision.reason, "mode": self.mode, "mode_reason": self.mode_reason,
                   "xla": self.mode == "xla",
                   "batch_size": feed.batch_size, "steps_per_call": self.k, "epochs": total / feed.steps_per_epoch,
                   "train_data": feed.source}
        if self.strategy is not None:
            summary["strategy"] = engine.placement
        with contextlib.ExitStack() as guards:
            for folder, what in ((run_dir, "run directory"), (checkpoint_dir if chief else None, "checkpoint directory")):
                if folder and not _inside(folder, run_dir if what != "run directory" else None):
                    guards.enter_context(runguard.RunLock(folder, what))
            if chief and checkpoint_dir and not o.resume and checkpoint.on_disk(checkpoint_dir):
                raise UsageError(f"{checkpoint_dir!r} already holds checkpoints (newest "
                                 f"{os.path.basename(checkpoint.on_disk(checkpoint_dir)[0])}): continue that run with "
                                 f"--resume (resume=True), or choose another --run-name / run_dir")
            identity = self.identity() if checkpoint_dir else {}
            done = self._completed(checkpoint_dir, total, run_dir, identity) if o.resume and checkpoint_dir else None
            if done is not None:
                say(done.summary.pop("note"))
                return done
            stop = guards.enter_context(runguard.StopSignals())
            stop.latest_checkpoint = lambda: (checkpoint.on_disk(checkpoint_dir) or [None])[0] if checkpoint_dir else None
            warn = (lambda line: say(f"warning: {line}")) if verbose else (
                lambda line: warnings.warn(line, RuntimeWarning, stacklevel=2))
            progress = Progress(out=out, live=verbose != 2) if verbose else None   # 2: epoch lines only, as Keras
            loop, checkpoints, observer = self._loop(start, total, run_dir, checkpoint_dir, identity, say,
                                                     [*([progress] if progress else []),
                                                      *([FigureWarnings(warn)] if chief else []), *callbacks])
            agree = getattr(engine, "any_worker", lambda flag: flag)
            loop.should_stop = lambda: agree(stop.received is not None)
            if self.preflight and not (o.resume and checkpoint.on_disk(checkpoint_dir or "")):
                try:
                    with phases.phase("pre-flight: compiled and eager on the first batch, compiling the step"):
                        result = self.preflight(next(iter(feed.dataset.take(1))))
                except tf.errors.InvalidArgumentError as e:   # its warm-up ran the first call's batches
                    raise DataError(f"a batch of the first call was refused by TensorFlow: {_what_is_wrong(e)}") from None
                summary["preflight"] = result.to_json()
                say(result.line())
                if loop.should_stop():   # a signal while it compiled (every worker agrees): no step is taken
                    name, code = _signal_of(stop)
                    raise Interrupted(name, start, stop.latest_checkpoint(), code, during="the pre-flight")
            try:
                with progress or contextlib.nullcontext():   # a line redrawn in place ends before any other
                    loop.run()
            except NonFiniteLoss as e:
                # A label the loss cannot take is bad input, not a NaN (XLA). Under a strategy every worker
                # reads the whole global batch and the guard's verdict is all-reduced: each says the same line.
                input_checks.labels_of_call(engine, e.batch, self.k, e.first_step)
                last = checkpoints.latest if checkpoints else None
                summary["non_finite"] = {"step": e.step, "last_good_checkpoint": last}
                summary["guard"] = report.guard(engine, self.k)
                report.write(run_dir, summary, say)
                raise NonFiniteError(e.step, last, summary) from None
            except tf.errors.OpError as e:
                if self.strategy is None or not isinstance(e, distribute.PEER_FAULTS):
                    if isinstance(e, tf.errors.InvalidArgumentError):   # a later batch the step cannot take
                        raise DataError(f"a batch after step {loop.steps_done} was refused by TensorFlow: "
                                        f"{_what_is_wrong(e)}") from None
                    raise
                raise PeerLost(distribute.first_line(e), loop.steps_done, checkpoints.latest if checkpoints else None) from None
            except StopRequested:
                if checkpoints:
                    checkpoints.on_train_end(loop)
                if observer and observer.window:
                    observer.window.on_train_end(loop)   # a trace in progress is written, not lost
                latest = checkpoints.latest if checkpoints else None
                name, code = _signal_of(stop)
                summary["interrupted"] = {"signal": name, "step": loop.steps_done, "checkpoint": latest}
                self._fill(summary, loop, checkpoints, observer, say, measure_peak=False)
                report.write(run_dir, summary, say)
                raise Interrupted(name, loop.steps_done, latest, code, summary) from None
            self._fill(summary, loop, checkpoints, observer, say)
            report.write(run_dir, summary, say)
        return FitResult(summary["history"], summary, run_dir)

    def _fill(self, summary, loop, checkpoints, observer, say, measure_peak: bool = True) -> None:
        report.fill(summary, loop, self.engine, self.feed, self.k, self.precision.name, self.mode, checkpoints,
                    observer, self.warm_up_seconds(), distributed=self.strategy is not None,
                    measure_peak=measure_peak)
        rechecked = [line for line in (check(summary) for check in self.rechecks) if line]
        if rechecked:
            summary["rechecked"] = rechecked
            for line in rechecked:
                say(line)

    def _loop(self, start, total, run_dir, checkpoint_dir, identity, say, extra_callbacks):
        """The loop from step `start` to `total` with its callbacks: TensorBoard (run_dir), checkpoints
        (checkpoint_dir), the rest."""
        o, feed = self.options, self.feed
        loop = Loop(self.engine, feed.dataset, self.evaluation, total, feed.steps_per_epoch, self.k, feed.batch_size,
                    steps_done=start)
        callbacks: list[Callback] = []
        observer = checkpoints = None
        if run_dir:
            observer = tensorboard.Observer(run_dir, os.path.dirname(os.path.normpath(run_dir)) or ".",
                                            o.profile_steps, o.summary_every)
            callbacks += observer.callbacks
        if checkpoint_dir:
            unsaveable = feeding.checkpointable(loop.iterator)
            if unsaveable:
                say(f"note: the training data's position cannot be checkpointed ({unsaveable}); checkpoints "
                    f"hold the models, optimizers and step counter, and a resumed run restarts the data from "
                    f"its beginning")
            checkpoints = checkpoint.Checkpoints(checkpoint_dir, o.checkpoint_every or feed.steps_per_epoch, o.resume,
                                                 self.precision.name, identity, with_data=unsaveable is None, say=say,
                                                 writer=distribute.is_chief(self.strategy))
            callbacks.append(checkpoints)
        loop.callbacks = [*callbacks, *extra_callbacks]
        return loop, checkpoints, observer

    def identity(self) -> dict:
        """What makes a run the same run on resume: the options' IDENTITY fields (with the values in use),
        the data, K, models and optimizers, and the caller's extras."""
        data = self.feed.fingerprint
        first = first_batch_digest(self.feed.user_dataset) if self.feed.user_dataset is not None else None
        if first:
            data += f", first batch {first}"
        return {**engine_identity(self.engine, (*self.identity_records, self.options), self.feed.batch_size, self.k),
                "data": data, **dict(self.options.identity or {})}

    def _completed(self, checkpoint_dir: str, total: int, run_dir: str | None, identity: dict) -> FitResult | None:
        """A resume of a run that already reached `total` steps changes nothing and says so."""
        for prefix in checkpoint.on_disk(checkpoint_dir):
            try:
                meta = checkpoint.read_meta(prefix)
            except Exception:
                continue
            checkpoint.check_same_run(prefix, meta, self.precision.name, identity)
            if meta["steps"] < total:
                return None
            previous = {}
            if run_dir and os.path.exists(os.path.join(run_dir, "summary.json")):
                previous = atomic.read_json_object(os.path.join(run_dir, "summary.json"), "the run's summary",
                                                   "delete it (the checkpoints hold the run) and resume again")
            previous.setdefault("history", meta.get("history", []))
            previous["note"] = (f"the run is complete: {prefix} is at step {meta['steps']} of {total}; nothing "
                                f"changed (give more epochs or steps to extend it)")
            return FitResult(previous["history"], previous, run_dir)
        return None


def engine_identity(engine, records: tuple, batch_size: int, k: int) -> dict:
    """The part of a run's identity its engine and option records give: IDENTITY fields (the batch size in
    use), K, the models' variable shapes and the optimizers' settings."""
    def optimizer(opt):
        inner = getattr(opt, "inner_optimizer", opt)
        config = inner.get_config() if hasattr(inner, "get_config") else {}
        keep = {k: v for k, v in config.items() if k not in ("name",) and isinstance(v, (int, float, str, bool))}
        return {"class": type(inner).__name__, **keep}
    return {**identity_fields(*records, batch_size=batch_size), "steps_per_call": k,
            "models": {n: f"{type(m).__name__} " + " ".join(str(v.shape.as_list()) for v in m.trainable_variables)
                       for n, m in engine.models.items()},
            "optimizers": {n: optimizer(o) for n, o in engine.optimizers.items()}}


def first_batch_digest(ds: tf.data.Dataset) -> str | None:
    """A hash of a dataset's first element, when two fresh iterators agree on it (None for a dataset that
    draws a new order each time). A checkpointed iterator keeps batches it had buffered, so a resume given
    other data would train on the old batches first: this digest, part of the run's identity, refuses it."""
    def digest():
        h = hashlib.blake2b(digest_size=8)
        for element in ds.take(1):
            for leaf in tf.nest.flatten(element):
                h.update(np.ascontiguousarray(leaf.numpy()).tobytes())
        return h.hexdigest()
    first = digest()
    return first if first == digest() else None


def _inside(folder: str, parent: str | None) -> bool:
    """Whether `folder` lies inside `parent` (then the parent's lock covers it)."""
    if parent is None:
        return False
    folder, parent = os.path.abspath(folder), os.path.abspath(parent)
    return folder == parent or folder.startswith(parent + os.sep)


def _what_is_wrong(error: tf.errors.OpError) -> str:
    """TensorFlow's own sentence (the line before its `[[{{node ...}}]]` op trace), without the node
    prefix, the Python stack it may print first, or the values it lists."""
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    ends = [i for i, line in enumerate(lines) if line.startswith("[[")]
    line = lines[ends[0] - 1] if ends and ends[0] > 0 else (lines[0] if lines else type(error).__name__)
    return line.split("}} ", 1)[-1].split("  Label values:")[0].strip()


def _signal_of(stop: runguard.StopSignals) -> tuple[str, int]:
    """The signal that stops the run and its exit code. A worker whose peer got the signal stops at the same
    call (any_worker), as if it got SIGTERM."""
    if stop.received:
        return stop.name, runguard.EXIT_CODES[stop.received]
    return "SIGTERM (on another worker)", runguard.EXIT_CODES[signal.SIGTERM]
