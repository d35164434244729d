"""`fastcore.Trainer`: the public entry point. Your model(s), optimizer(s), loss or step; fastcore's guarantees.

    trainer = fastcore.Trainer(model, keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    result = trainer.fit(x, y, batch_size=500, epochs=5, validation_data=(xv, yv), run_dir="profiles/higgs")

Who owns what: the user owns the model, the optimizer(s) and either a loss (fastcore writes the step) or
a step function (`step(batch, ctx) -> fastcore.Update`, computing losses and gradients with its own
GradientTape). fastcore owns compiling it (XLA / graph / eager twin), feeding it, the finiteness guard
and float16 loss scaling, the loop, checkpoints, the pre-flight check, verify, and observation.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import keras
import tensorflow as tf

from fastcore import atomic, distribute
from fastcore.callbacks import Callback
from fastcore.engine import autoprecision, checkpoint, feeding, preflight, runguard, verify as verifying
from fastcore.engine.loss_step import loss_eval, loss_step, named_metrics, unpack
from fastcore.engine.loop import Loop, NonFiniteLoss, StopRequested
from fastcore.engine.precision import Precision, resolve
from fastcore.engine.step import MODES, Engine, StepContext
from fastcore.errors import Interrupted, NonFiniteError, PeerLost, PreflightError, UsageError
from fastcore.observe import flops, tensorboard
from fastcore.observe.progress import Progress

CALL_EXAMPLES = 8192   # default steps per call: about this many examples per compiled call...
MAX_STEPS_PER_CALL = 64   # ...and at most this many steps (progress and checkpoints stay timely)


@dataclasses.dataclass
class FitResult:
    """What `Trainer.fit` returns: per-epoch history (train_<name>, eval_<name>) and the run's summary."""
    history: list[dict]
    summary: dict
    run_dir: str | None


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


class Trainer:
    """Trains your model(s) with compiled steps, checked against their eager twin.

    Args:
      model: a Keras model (any API), a tf.Module, or a zero-argument factory returning one; or a dict
        of named ones (several models, e.g. {"gen": ..., "disc": ...}), or one factory returning such a dict. Factories are called under the
        run's Keras dtype policy, which is what lets `precision` other than float32 (and auto) work;
        `training=` and `.losses` are used when the model has them.
      optimizer: a Keras optimizer or any object with `apply_gradients`; or a dict of them, each named
        after the model it updates. float16 wraps Keras optimizers in LossScaleOptimizer.
      loss: with one model, a Keras loss object, a Keras loss name, or any callable
        `(y_true, y_pred) -> per-example loss`; fastcore writes the step. Data elements are (x, y) or
        (x, y, sample_weight).
      metrics: callables `(y_true, y_pred) -> per-example values` (list, or dict by name), evaluated on
        validation data.
      step: instead of `loss`, your step function `step(batch, ctx) -> fastcore.Update`; see StepContext.
        It is traced by tf.function without AutoGraph (as Keras 3 traces its train step): write
        data-dependent branches with tf.cond / tf.where.
      eval_step: with `step`, optional `eval_step(batch, ctx) -> {name: per-example values}`.
      precision: float32 | bfloat16 | float16 | auto (auto needs model factories to time both). Under
        mode="xla", auto may run bfloat16 as a plain graph when that step is measured faster (oneDNN's
        AMX matmuls, which XLA:CPU lacks); `run_mode` and the summary's "mode" say which ran.
      mode: xla (tf.function(jit_compile=True)) | graph (plain tf.function) | eager (the reference twin).
      steps_per_call: K optimizer steps per compiled call (default: about 8k examples, at most 64,
        dividing the epoch).
      seed: for fastcore's data order, `ctx.seed()` and the weights of factory-built models.
      preflight: compare compiled and eager on the first batch before training (default True).
      strategy: a tf.distribute.Strategy (default None: one device, the path without any distribution
        code). fastcore builds the models from their factories and re-creates each Keras optimizer from
        its config under `strategy.scope()` (an optimizer made outside the scope trains each replica
        apart, silently); each replica takes its slice of the global batch; `verify` becomes the
        distributed twin. See fastcore.distribute and fastcore.engine.distributed.
    """

    def __init__(self, model, optimizer, loss=None, *, metrics=None, step: Callable | None = None,
                 eval_step: Callable | None = None, precision: str = "float32", mode: str = "xla",
                 steps_per_call: int | None = None, seed: int = 0, preflight: bool = True, strategy=None):
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if (loss is None) == (step is None):
            raise UsageError("give either loss= (fastcore writes the step) or step= (your step function), not "
                             + ("both" if loss is not None else "neither"))
        if steps_per_call is not None and steps_per_call <= 0:
            raise UsageError(f"steps_per_call={steps_per_call} must be positive")
        self.model_specs = _named(model, "model")
        self.optimizer_specs = _named(optimizer, "optimizer")
        for name, opt in self.optimizer_specs.items():
            if not hasattr(opt, "apply_gradients"):
                raise UsageError(f"optimizer {name!r} ({type(opt).__name__}) has no apply_gradients method")
        if loss is not None and len(self.model_specs) != 1:
            raise UsageError("loss= trains one model; with several models, write a step function (step=)")
        self.loss, self.metrics = loss, named_metrics(metrics)
        self.strategy = strategy
        if strategy is not None:
            _check_distributable(strategy, self.model_specs, self.optimizer_specs, mode)
        self.step_fn, self.eval_fn = step, eval_step
        self.precision_name, self.mode, self.steps_per_call = precision, mode, steps_per_call
        self.seed, self.run_preflight = seed, preflight
        self.engine: Engine | None = None
        self.precision: Precision | None = None
        self.preflight_report: preflight.PreflightReport | None = None
        self._built_models: dict | None = None
        self.warm_up_seconds: float | None = None
        self._k = 1   # steps per compiled call of the feed in use (set by fit / verify)

    # -- building ------------------------------------------------------------------------------------
    @property
    def factories(self) -> bool:
        return all(_is_factory(m) for m in self.model_specs.values())

    @property
    def models(self) -> dict:
        """The trained models by name (built on first use when given as factories)."""
        if self._built_models is None:
            self._built_models = self._build_models(self.precision or Precision("float32", "default"),
                                                    distributed=True)
        return self._built_models

    @property
    def run_mode(self) -> str:
        """The compiled path the run uses: `mode`, unless precision="auto" chose bfloat16 as a plain graph."""
        return (self.precision and self.precision.mode) or self.mode

    def _scope(self, distributed: bool):
        """The strategy's scope for the run's own variables; none for single-device twins and timing."""
        return self.strategy.scope() if distributed and self.strategy is not None else contextlib.nullcontext()

    def _build_models(self, precision: Precision, distributed: bool = False) -> dict:
        built = {}
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(precision.policy)
        try:
            with self._scope(distributed):
                keras.utils.set_random_seed(self.seed)
                for name, spec in self.model_specs.items():
                    built[name] = spec() if _is_factory(spec) else spec
                if len(built) == 1 and isinstance(next(iter(built.values())), Mapping):
                    built = dict(next(iter(built.values())))   # one factory that builds several named models
        finally:
            keras.config.set_dtype_policy(previous)
        for name, m in built.items():
            if not hasattr(m, "trainable_variables"):
                raise UsageError(f"model {name!r} ({type(m).__name__}) has no trainable_variables: pass a Keras "
                                 f"model, a tf.Module, or a factory returning one")
            if not m.trainable_variables:
                raise UsageError(f"model {name!r} has no trainable variables yet: build it (call it once on an "
                                 f"example batch, or give keras.Input) before training")
        return built

    def _optimizers(self, precision: Precision, fresh: bool = False, distributed: bool = False) -> dict:
        """The run's optimizers (float16: each in a LossScaleOptimizer). `fresh` clones them (twins, timing);
        under a strategy they are always clones made in its scope, where their variables must be created."""
        out = {}
        with self._scope(distributed):
            for name, opt in self.optimizer_specs.items():
                opt = _clone_optimizer(opt) if fresh or (distributed and self.strategy is not None) else opt
                if precision.loss_scaling and not isinstance(opt, keras.optimizers.LossScaleOptimizer):
                    if not isinstance(opt, keras.optimizers.Optimizer):
                        raise UsageError(f"float16 needs dynamic loss scaling: optimizer {name!r} must be a Keras "
                                         f"optimizer (wrapped in keras.optimizers.LossScaleOptimizer by fastcore)")
                    opt = keras.optimizers.LossScaleOptimizer(opt)
                out[name] = opt
        return out

    def _make_engine(self, precision: Precision, mode: str, batch_size: int, models: dict, optimizers: dict,
                     distributed: bool = False) -> Engine:
        step_fn, eval_fn = self.step_fn, self.eval_fn
        if self.loss is not None:
            model = next(iter(models.values()))
            step_fn, eval_fn = loss_step(model, self.loss), loss_eval(model, self.loss, self.metrics)
        settings = dict(eval_fn=eval_fn, mode=mode, global_batch_size=batch_size, seed=self.seed,
                        loss_scaling=precision.loss_scaling)
        if distributed and self.strategy is not None:
            from fastcore.engine.distributed import DistributedEngine
            return DistributedEngine(self.strategy, models, optimizers, step_fn, **settings)
        return Engine(models, optimizers, step_fn, **settings)

    def _resolve_precision(self, feed: feeding.Feed) -> Precision:
        chosen = self._choose_precision(feed)
        if self.precision_name == "auto" and distribute.multi_worker(self.strategy):
            # Each worker measured alone; they must train in one precision, or their collectives mismatch.
            names = ("float32", "bfloat16", "float16")
            votes = distribute.replica_sums(self.strategy, [float(chosen.name == n) for n in names])
            if votes[names.index(chosen.name)] != self.strategy.num_replicas_in_sync:
                return Precision("float32", "auto: the workers measured different winners, so all train in float32")
        return chosen

    def _choose_precision(self, feed: feeding.Feed) -> Precision:
        graph_bf16 = self.mode == "xla" and self.strategy is None   # XLA:CPU lacks oneDNN's AMX bfloat16 matmuls
        proposal = resolve(self.precision_name, xla=self.mode == "xla", graph_bf16=graph_bf16)
        if self.precision_name != "auto" or proposal.name != "bfloat16":
            return proposal
        if not self.factories or self._built_models is not None:
            return Precision("float32", "auto: the model was passed built, so it cannot be rebuilt in bfloat16 to "
                                        "time both; pass a factory (a function returning the model) to let auto choose")
        shapes = ";".join(f"{name}:{type(m).__name__}:" + ",".join(str(v.shape) for v in m.trainable_variables)
                          for name, m in self._build_models(Precision("float32", "key")).items())
        key = f"step/{shapes}/b{feed.batch_size}/k{self._steps_per_call(feed)}/{self.mode}"
        candidates = ("float32", "bfloat16") + ((autoprecision.GRAPH_BF16,) if graph_bf16 else ())
        return autoprecision.confirm(proposal, key, lambda: self._time_precisions(feed, candidates), candidates)

    def _time_precisions(self, feed: feeding.Feed, candidates: tuple[str, ...]) -> dict[str, float]:
        batch = next(iter(feed.dataset.take(1)))
        k = self._steps_per_call(feed)
        calls = {}
        for candidate in candidates:
            name, _, mode = candidate.partition("/")
            p = Precision(name, "timing")
            engine = self._make_engine(p, mode or self.mode, feed.batch_size, self._build_models(p),
                                       self._optimizers(p, fresh=True))
            fn = engine.train_many if k > 1 else engine.train_one
            calls[candidate] = lambda fn=fn: tf.nest.map_structure(lambda t: t.numpy(), fn(batch))
        return autoprecision.time_calls(calls, feed.batch_size * k)

    def _steps_per_call(self, feed: feeding.Feed) -> int:
        if self.steps_per_call:
            return self.steps_per_call
        target = max(1, min(MAX_STEPS_PER_CALL, CALL_EXAMPLES // feed.batch_size))
        return largest_divisor_at_most(feed.steps_per_epoch, target)

    def build(self, feed: feeding.Feed, resume_from: str | None = None) -> Engine:
        """Resolve the precision, build the models (factories) and optimizers, and set up the compiled step
        for `feed`'s batch size. fit() and verify() call it; call it first to read `trainer.precision`.
        `resume_from`: a checkpoint folder whose recorded precision `auto` adopts."""
        if self.engine is not None:
            if self.engine.global_batch_size != feed.batch_size:
                raise UsageError(f"this Trainer compiled its step for batch size {self.engine.global_batch_size}; "
                                 f"got {feed.batch_size}: use a new Trainer for another batch size")
            return self.engine
        recorded = checkpoint.recorded_precision(resume_from) if resume_from else None
        if self.precision_name == "auto" and recorded:   # a resumed run keeps the precision it was trained in
            path = self._choose_precision(feed).mode if recorded == "bfloat16" else None   # auto's cached path
            self.precision = Precision(recorded, "auto: as trained in the checkpoint it resumes", mode=path)
        else:
            self.precision = self._resolve_precision(feed)
        if self.precision.name != "float32" and not self.factories:
            policy = getattr(next(iter(self.models.values())), "dtype_policy", None)
            if policy is not None and getattr(policy, "name", None) != self.precision.policy:
                raise UsageError(f"precision {self.precision.name} needs the model built under the "
                                 f"{self.precision.policy} policy: pass a factory (a function returning the "
                                 f"model) and fastcore builds it so")
        models = self.models
        self.engine = self._make_engine(self.precision, self.run_mode, feed.batch_size, models,
                                        self._optimizers(self.precision, distributed=True), distributed=True)
        return self.engine

    # -- public calls --------------------------------------------------------------------------------
    def feed(self, x, y=None, *, batch_size: int | None = None, steps_per_epoch: int | None = None,
             source: str | None = None) -> feeding.Feed:
        """The training stream fit() would use (K batches stacked per element when steps_per_call > 1);
        fit(), verify() and build() accept it in place of x, so data is loaded once."""
        if isinstance(x, feeding.Feed):
            return x
        probe = feeding.training_feed(x, y, batch_size=batch_size, steps_per_call=1, seed=self.seed,
                                      steps_per_epoch=steps_per_epoch, source=source)
        k = self._steps_per_call(probe)
        if k == 1:
            return probe
        return feeding.training_feed(x, y, batch_size=batch_size, steps_per_call=k, seed=self.seed,
                                     steps_per_epoch=steps_per_epoch, source=source)

    def preflight(self, first_call) -> preflight.PreflightReport:
        """Compare compiled and eager losses and gradients on the first batch of `first_call` (an element of
        the feed: K stacked batches when steps_per_call > 1; fit calls this before training); raise
        PreflightError (the one line) when they disagree. Changes no weight.

        Meanwhile the training call is compiled on `first_call` with updates off (the guard's skip branch,
        no step counted), so the two compiles overlap; float16 applies through the loss
        scaler, which has no such switch, so there the pre-flight runs alone."""
        engine = self.engine
        batch = tf.nest.map_structure(lambda t: t[0], first_call) if self._k > 1 else first_call
        overlap = not engine.loss_scaling and self.strategy is None   # strategy.run's replica threads stay alone
        warm_up = (lambda: self._compile_training_call(first_call)) if overlap else None
        report = preflight.check(engine, batch, self.precision.name, warm_up)
        if self.warm_up_seconds:   # the training compile it overlapped would have happened anyway
            report.extra_seconds = max(report.seconds - self.warm_up_seconds, 0.0)
        self.preflight_report = report
        if not report.passed:
            raise PreflightError(report.line(), report)
        return report

    def _compile_training_call(self, first_call) -> None:
        """Compile (and run) the training call on `first_call` with updates off: applies nothing, counts no step."""
        engine = self.engine
        train_fn = engine.train_many if self._k > 1 else engine.train_one
        engine.updates_on.assign(False)
        try:
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), train_fn(first_call))
            self.warm_up_seconds = time.perf_counter() - start
        finally:
            engine.updates_on.assign(True)

    def verify(self, x, y=None, *, steps: int = 20, batch_size: int | None = None,
               steps_per_epoch: int | None = None) -> verifying.Report:
        """Run `steps` steps compiled and `steps` eagerly from one state on the same batches and compare
        every variable (the eager reference twin). The state is put back afterwards; nothing is trained.
        bfloat16/float16 are judged against a float32 eager reference (needs model factories).
        Under a strategy, the distributed twin instead: `steps` steps distributed and `steps` on one
        device from the same state on the same global batches, and every replica (worker) against replica 0."""
        if steps <= 0:
            raise UsageError(f"verify steps={steps} must be positive")
        feed = self.feed(x, y, batch_size=batch_size, steps_per_epoch=steps_per_epoch)
        engine = self.build(feed)
        if engine.mode == "eager":
            raise UsageError("verify compares the compiled step with the eager one: use mode='xla' or 'graph'")
        self._k = self._steps_per_call(feed)
        batches = list(feed.dataset.take(math.ceil(steps / self._k)))
        if self.strategy is not None:   # the distributed twin: the same steps on one device
            single = self._make_engine(self.precision, self.run_mode, feed.batch_size, self._build_models(self.precision),
                                       self._optimizers(self.precision, fresh=True))
            return verifying.verify_distributed(engine, single, batches, self.precision, self._k > 1)
        reference = None
        if self.precision.name != "float32":
            if not self.factories:
                raise UsageError(f"verify in {self.precision.name} compares against a float32 reference built "
                                 f"from the model's factory: pass the model as a factory")
            f32 = Precision("float32", "reference")
            reference = self._make_engine(f32, "eager", feed.batch_size, self._build_models(f32),
                                          self._optimizers(f32, fresh=True))
        return verifying.verify(engine, batches, self.precision, self._k > 1, reference)

    def fit(self, x=None, y=None, *, batch_size: int | None = None, epochs: int = 1, steps: int | None = None,
            steps_per_epoch: int | None = None, validation_data=None, validation_batch_size: int | None = None,
            run_dir: str | None = None, checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
            resume: bool = False, profile_steps: str | None = None, summary_every: int | None = None,
            deterministic: bool = False, callbacks: Sequence[Callback] = (), verbose: bool = True,
            out: TextIO | None = None, summary_fields: Mapping[str, Any] | None = None,
            identity: Mapping[str, Any] | None = None, train_source: str | None = None) -> FitResult:
        """Train; Keras-like arguments plus what Keras lacks. Returns FitResult(history, summary, run_dir).

        x, y: numpy arrays (in-memory fast path), or x a tf.data.Dataset of batches (tuples or dicts) and
          y None. validation_data: (x_val, y_val) arrays or a dataset of batches; every example counts
          exactly once. epochs, or steps (total optimizer steps); steps_per_epoch for a dataset of
          unknown length.
        run_dir: where TensorBoard scalars, the profile trace, checkpoints and summary.json go (None: no
          files). checkpoint_dir defaults to <run_dir>/checkpoints; checkpoint_every in steps (default: an
          epoch); resume continues from its latest checkpoint. profile_steps "A:B" traces steps A..B.
        deterministic: TensorFlow op determinism (a resumed run then ends bit-identical).
        identity: extra fields that make this run this run (a resume with any of them changed is refused).
        A run directory is locked while fit runs (a second fit on it is refused). SIGINT/SIGTERM stop after
        the compiled call in flight with a checkpoint and raise Interrupted.
        Raises UsageError/DataError for bad input, PreflightError, NonFiniteError (with .summary),
        CheckpointMismatch, Interrupted; all with one-line messages.
        """
        out = out or sys.stdout
        chief = distribute.is_chief(self.strategy)
        # The chief's checkpoint folder: every worker restores from it (storage all workers can read).
        checkpoint_dir = checkpoint_dir or (os.path.join(run_dir, "checkpoints") if run_dir else None)
        if not chief:   # a multi-worker run's other workers train alongside and write nothing of their own
            run_dir, verbose, callbacks = None, False, ()
        self.warm_up_seconds = None
        feed = self.feed(x, y, batch_size=batch_size, steps_per_epoch=steps_per_epoch, source=train_source)
        self._k = k = self._steps_per_call(feed)
        if epochs is not None and epochs <= 0 and steps is None:
            raise UsageError(f"epochs={epochs} must be positive")
        if steps is not None and steps <= 0:
            raise UsageError(f"steps={steps} must be positive")
        total = steps if steps is not None else epochs * feed.steps_per_epoch
        total = math.ceil(total / k) * k
        tensorboard.check_options(profile_steps, summary_every, total)
        for name, folder in (("run_dir", run_dir), ("checkpoint_dir", checkpoint_dir)):
            atomic.check_writable(name, folder)
        if self.loss is not None:
            unpack(feed.dataset.element_spec)   # the same check as each step's, before the first one

        engine = self.build(feed, resume_from=checkpoint_dir if resume else None)
        if validation_data is not None:
            if isinstance(validation_data, tuple) and not feeding.is_dataset(validation_data[0]):
                evaluation = feeding.eval_batches(validation_data[0], validation_data[1], batch_size=validation_batch_size)
            else:
                evaluation = feeding.eval_batches(validation_data, batch_size=validation_batch_size)
            if engine.eval_fn is None:
                raise UsageError("validation_data needs an eval_step (a step function has no default evaluation)")
        else:
            evaluation = None
        if deterministic:
            tf.config.experimental.enable_op_determinism()
        engine.first_non_finite_step.assign(-1)   # a new fit starts healthy: no bad update was ever applied

        summary = {**(summary_fields or {}), "precision": self.precision.name,
                   "precision_reason": self.precision.reason, "mode": self.run_mode, "xla": self.run_mode == "xla",
                   "batch_size": feed.batch_size, "steps_per_call": k, "epochs": total / feed.steps_per_epoch,
                   "train_data": feed.source}
        if self.strategy is not None:
            summary["strategy"] = engine.placement
        say = (lambda line: print(line, file=out, flush=True)) if verbose else (lambda line: None)
        with contextlib.ExitStack() as guards:
            for folder, what in ((run_dir, "run directory"), (checkpoint_dir if chief else None, "checkpoint directory")):
                if folder and not _inside(folder, run_dir if what != "run directory" else None):
                    guards.enter_context(runguard.RunLock(folder, what))
            if chief and checkpoint_dir and not resume and checkpoint.on_disk(checkpoint_dir):
                raise UsageError(f"{checkpoint_dir!r} already holds checkpoints (newest "
                                 f"{os.path.basename(checkpoint.on_disk(checkpoint_dir)[0])}): continue that run with "
                                 f"--resume (resume=True), or choose another --run-name / run_dir")
            run_identity = self._identity(feed, identity)
            done = self._completed_run(checkpoint_dir, total, run_dir, run_identity) if resume and checkpoint_dir else None
            if done is not None:
                say(done.summary.pop("note"))
                return done
            stop = guards.enter_context(runguard.StopSignals())
            loop, checkpoints, observer = self._loop(engine, feed, evaluation, total, run_dir, checkpoint_dir,
                                                     checkpoint_every, resume, profile_steps, summary_every,
                                                     [*( [Progress(out=out)] if verbose else []), *callbacks],
                                                     run_identity, say)
            agree = getattr(engine, "any_worker", lambda flag: flag)
            loop.should_stop = lambda: agree(stop.received is not None)
            if self.run_preflight and self.run_mode != "eager" and not (resume and checkpoint.on_disk(checkpoint_dir or "")):
                report = self.preflight(next(iter(feed.dataset.take(1))))
                summary["preflight"] = report.to_json()
                say(report.line())
            try:
                loop.run()
            except NonFiniteLoss as e:
                last = checkpoints.latest if checkpoints else None
                summary["non_finite"] = {"step": e.step, "last_good_checkpoint": last}
                self._write_summary(run_dir, summary, say)
                raise NonFiniteError(e.step, last, summary) from None
            except tf.errors.OpError as e:
                if self.strategy is None or not isinstance(e, distribute.PEER_FAULTS):
                    raise
                raise PeerLost(distribute.first_line(e), loop.steps_done, checkpoints.latest if checkpoints else None) from None
            except StopRequested:
                if checkpoints:
                    checkpoints.on_train_end(loop)
                latest = checkpoints.latest if checkpoints else None
                # A worker whose peer got the signal stops at the same call (any_worker), as if it got SIGTERM.
                name, code = (stop.name, runguard.EXIT_CODES[stop.received]) if stop.received else (
                    "SIGTERM (on another worker)", runguard.EXIT_CODES[signal.SIGTERM])
                summary["interrupted"] = {"signal": name, "step": loop.steps_done, "checkpoint": latest}
                self._report(summary, loop, engine, feed, checkpoints, observer)
                self._write_summary(run_dir, summary, say)
                raise Interrupted(name, loop.steps_done, latest, code, summary) from None
            self._report(summary, loop, engine, feed, checkpoints, observer)
            self._write_summary(run_dir, summary, say)
        return FitResult(summary["history"], summary, run_dir)

    def _loop(self, engine, feed, evaluation, total, run_dir, checkpoint_dir, checkpoint_every, resume,
              profile_steps, summary_every, extra_callbacks, identity, say):
        """The loop with its callbacks: TensorBoard (run_dir), checkpoints (checkpoint_dir), the rest."""
        loop = Loop(engine, feed.dataset, evaluation, total, feed.steps_per_epoch, self._k, feed.batch_size)
        callbacks: list[Callback] = []
        observer = checkpoints = None
        if run_dir:
            observer = tensorboard.Observer(run_dir, os.path.dirname(os.path.normpath(run_dir)) or ".",
                                            profile_steps, summary_every)
            callbacks += observer.callbacks
        if checkpoint_dir:
            unsaveable = feeding.checkpointable(loop.iterator)
            if unsaveable:
                say(f"note: the training data's position cannot be checkpointed ({unsaveable}); checkpoints "
                    f"hold the models, optimizers and step counter, and a resumed run restarts the data from "
                    f"its beginning")
            checkpoints = checkpoint.Checkpoints(checkpoint_dir, checkpoint_every or feed.steps_per_epoch, resume,
                                                 self.precision.name, identity, with_data=unsaveable is None, say=say,
                                                 writer=distribute.is_chief(self.strategy))
            callbacks.append(checkpoints)
        loop.callbacks = [*callbacks, *extra_callbacks]
        return loop, checkpoints, observer

    def _identity(self, feed: feeding.Feed, extra: Mapping[str, Any] | None) -> dict:
        """What makes a run the same run on resume: data, batch, K, seed, models, optimizers (+ the caller's)."""
        def optimizer(opt):
            inner = getattr(opt, "inner_optimizer", opt)
            config = inner.get_config() if hasattr(inner, "get_config") else {}
            keep = {k: v for k, v in config.items() if k not in ("name",) and isinstance(v, (int, float, str, bool))}
            return {"class": type(inner).__name__, **keep}
        return {"data": feed.fingerprint, "batch_size": feed.batch_size, "steps_per_call": self._k,
                "seed": self.seed,
                "models": {n: f"{type(m).__name__} " + " ".join(str(v.shape.as_list()) for v in m.trainable_variables)
                           for n, m in self.engine.models.items()},
                "optimizers": {n: optimizer(o) for n, o in self.engine.optimizers.items()},
                **dict(extra or {})}

    def _completed_run(self, checkpoint_dir: str, total: int, run_dir: str | None, identity: dict) -> FitResult | None:
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
                with open(os.path.join(run_dir, "summary.json")) as f:
                    previous = json.load(f)
            previous.setdefault("history", meta.get("history", []))
            previous["note"] = (f"the run is complete: {prefix} is at step {meta['steps']} of {total}; nothing "
                                f"changed (give more epochs or steps to extend it)")
            return FitResult(previous["history"], previous, run_dir)
        return None

    def _report(self, summary, loop, engine, feed, checkpoints, observer) -> None:
        """Fill the summary from a loop that ran (wholly or until a stop)."""
        history = (checkpoints.previous_history if checkpoints else []) + loop.history
        final = history[-1] if history else {}
        summary.update({"steps": loop.steps_done, **loop.meter.report(), "train_loss": final.get("train_loss"),
                        "eval": {k_[len("eval_"):]: v for k_, v in final.items() if k_.startswith("eval_")},
                        "skipped_steps": engine.skipped_steps, "traces": engine.ledger.counts(),
                        "checkpoint": checkpoints.latest if checkpoints else None,
                        "resumed_from": checkpoints.restored_from if checkpoints else None,
                        "resumed_from_step": checkpoints.restored_step if checkpoints else None,
                        "history": history})
        if self.warm_up_seconds and "step_time_ms" in summary:   # the pre-flight's overlap compiled the step
            call = summary["step_time_ms"] * self._k / 1000
            summary["compile_seconds"] = max(self.warm_up_seconds - call, 0.0)
        if self.strategy is not None:   # measured at the end of every distributed run, not assumed
            summary["replica_spread"] = engine.replica_spread()
        if checkpoints and checkpoints.failed_saves:
            summary["failed_checkpoint_saves"] = checkpoints.failed_saves
        summary.update(self.flops_per_example(feed))
        if "examples_per_sec" in summary:
            summary.update(tensorboard.utilisation(summary["flops_per_example"], summary["examples_per_sec"],
                                                   self.precision.name, self.matmul_shapes(feed.batch_size)))
        if observer:
            summary.update(observer.report(engine.ledger, self.run_mode, summary))
        else:
            retraces = engine.ledger.retraces()
            summary.update({"retraced": bool(retraces), "retraces": retraces})

    @staticmethod
    def _write_summary(run_dir: str | None, summary: dict, say) -> None:
        """summary.json, atomically; a full or read-only disk costs the file, not the run (said in one line)."""
        if not run_dir:
            return
        path = os.path.join(run_dir, "summary.json")
        try:
            atomic.write_json(path, summary)
        except OSError as e:
            summary["summary_not_written"] = f"{path!r}: {e.strerror or e}"
            say(f"summary.json not written ({path!r}: {e.strerror or e}); the figures below are the run's")

    def matmul_shapes(self, batch_size: int) -> list[tuple[int, int, int]]:
        """(batch, in, out) of every 2-D weight: the step's dense matmuls, for the ceiling's step shape."""
        return [(batch_size, *v.shape.as_list()) for m in self.engine.models.values()
                for v in m.trainable_variables if v.shape.rank == 2]

    def flops_per_example(self, feed: feeding.Feed) -> dict:
        """Training FLOPs per example counted from graphs (see fastcore.observe.flops for the convention)."""
        engine = self.engine
        spec = feed.dataset.element_spec
        if self._k > 1:
            spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), spec)
        step_graph = tf.function(lambda b: preflight.outputs(engine, b), autograph=False)
        forward = None
        if engine.eval_fn is not None:
            forward = tf.function(lambda b: engine.eval_fn(b, StepContext(engine, training=False)), autograph=False)
        return flops.per_example(step_graph.get_concrete_function(spec),
                                 forward.get_concrete_function(spec) if forward else None, feed.batch_size)


# -- helpers -------------------------------------------------------------------------------------------
def _is_factory(spec) -> bool:
    return callable(spec) and not hasattr(spec, "trainable_variables")


def _named(value, what: str) -> dict:
    if isinstance(value, Mapping):
        if not value:
            raise UsageError(f"no {what}: give one, or a dict of named ones")
        return dict(value)
    if value is None:
        raise UsageError(f"no {what} given")
    return {what: value}


def _check_distributable(strategy, model_specs: dict, optimizer_specs: dict, mode: str) -> None:
    """What a strategy needs, refused up front in one line each."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise UsageError(f"strategy={type(strategy).__name__}: give a tf.distribute.Strategy (or None for one device)")
    if not all(_is_factory(m) for m in model_specs.values()):
        raise UsageError("under a strategy, pass each model as a factory (a function returning it): its variables "
                         "must be created under strategy.scope(), so fastcore builds it there")
    for name, opt in optimizer_specs.items():
        if not isinstance(getattr(opt, "inner_optimizer", opt), keras.optimizers.Optimizer):
            raise UsageError(f"under a strategy, optimizer {name!r} must be a Keras optimizer: its apply_gradients "
                             f"all-reduces the replicas' gradients ({type(opt).__name__} would update each replica "
                             f"apart, silently)")
    if mode == "eager":
        raise UsageError("mode='eager' is the single-device reference twin: under a strategy use 'xla' or 'graph'")


def _clone_optimizer(opt):
    """A fresh optimizer with `opt`'s settings (for the float32 reference twin and auto's timing)."""
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        opt = opt.inner_optimizer
    if isinstance(opt, keras.optimizers.Optimizer):
        return type(opt).from_config(opt.get_config())
    return copy.deepcopy(opt)


def _inside(folder: str, parent: str | None) -> bool:
    """Whether `folder` lies inside `parent` (then the parent's lock covers it)."""
    if parent is None:
        return False
    folder, parent = os.path.abspath(folder), os.path.abspath(parent)
    return folder == parent or folder.startswith(parent + os.sep)
