"""`fastcore.Trainer`: the public entry point. Your model(s), optimizer(s), loss or step; fastcore's guarantees.

    trainer = fastcore.Trainer(model, keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    result = trainer.fit(x, y, batch_size=500, epochs=5, validation_data=(xv, yv), run_dir="profiles/higgs")

Who owns what: the user owns the model, the optimizer(s) and either a loss (fastcore writes the step) or
a step function (`step(batch, ctx) -> fastcore.Update`, computing losses and gradients with its own
GradientTape). fastcore owns compiling it (XLA / graph / eager twin), feeding it, the finiteness guard
and float16 loss scaling, the loop, checkpoints, the pre-flight check, verify, and observation.
This class is a facade: each call checks its arguments and hands plain values to the engine
(assembly, autoprecision, feeding, run, verify, preflight), which knows nothing of the Trainer.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

from fastcore import keras_callbacks, threads
from fastcore.callbacks import Callback
from fastcore.engine import autoprecision, checkpoint, feeding, inference, pathchoice, preflight, sample_weights
from fastcore.engine import input_checks, loss_step as loss_steps, verify as verifying
from fastcore.engine.assembly import Assembly
from fastcore.engine.online import NothingBuilt, OnlineSteps
from fastcore.engine.precision import Precision
from fastcore.engine.run import FitResult, Run, engine_identity
from fastcore.engine.step import Engine
from fastcore.errors import PreflightError, UsageError
from fastcore.observe import phases
from fastcore.options import FitOptions, TrainerOptions

__all__ = ["Trainer", "FitResult"]


class Trainer:
    """Trains your model(s) with compiled steps, checked against their eager twin.

    Args:
      model: a Keras model (any API), a tf.Module, or a factory returning one (called under the run's dtype
        policy: what precisions other than float32 need); or a dict of named ones ({"gen": ..., "disc": ...}),
        or a factory returning such a dict. `training=` and `.losses` are used when the model has them.
      optimizer: a Keras optimizer or any object with `apply_gradients`; or a dict of them, each named
        after the model it updates. float16 wraps Keras optimizers in LossScaleOptimizer.
      loss, metrics, loss_weights, weighted_metrics: as Keras' compile takes them (names, functions, Keras
        objects; per output name for a model with several); fastcore writes the step. Data elements are
        (x, y) or (x, y, sample_weight).
      step: instead of `loss`, `step(batch, ctx) -> fastcore.Update` (see StepContext), or phases
        [(critic_step, 3), generator_step] applied in turn; traced without AutoGraph, as Keras 3 traces its
        train step (data-dependent branches: tf.cond / tf.where).
      eval_step: with `step`, optional `eval_step(batch, ctx) -> {name: per-example values}`.
      precision: float32 | bfloat16 | float16 | auto (needs model factories to time both; may run bfloat16 as
        a plain graph where oneDNN's matmuls beat XLA's: `run_mode` and the summary's "mode" say which ran).
      mode: auto (default: XLA and a plain graph, each with one and with K steps per call, timed on the
        run's first batches, the fastest kept; see fastcore.engine.pathchoice) | xla
        (tf.function(jit_compile=True)) | graph (plain tf.function) | eager (the reference twin).
      steps_per_call: K optimizer steps per compiled call (default: about 8k examples, at most 128,
        dividing the epoch; 1 for a convnet under mode="xla"; under XLA a convnet's steps on a CPU are
        unrolled in the compiled call, not looped, so its compile time grows with K).
      seed: for fastcore's data order, `ctx.seed()` and the weights of factory-built models.
      preflight: compare compiled and eager on the first batch before training (default True).
      strategy: a tf.distribute.Strategy (default None: one device, no distribution code). Models are built
        from their factories and each Keras optimizer re-created from its config under `strategy.scope()`
        (one made outside trains each replica apart, silently); `verify` becomes the distributed twin.
      max_shapes: how many batch shapes the step may be compiled for (data padded per batch).
    """

    def __init__(self, model, optimizer, loss=None, *, metrics=None, step: Callable | None = None,
                 eval_step: Callable | None = None, precision: str = "float32", mode: str = "auto",
                 steps_per_call: int | None = None, seed: int = 0, preflight: bool = True, strategy=None,
                 max_shapes: int = 8, loss_weights=None, weighted_metrics=None):
        self.options = TrainerOptions(precision, mode, steps_per_call, seed, preflight, max_shapes)
        self.assembly = Assembly(model, optimizer, loss, metrics, step, eval_step, seed, strategy, mode,
                                 loss_weights=loss_weights, weighted_metrics=weighted_metrics, max_shapes=max_shapes)
        self.engine: Engine | None = None
        self.precision: Precision | None = None
        self.preflight_report: preflight.PreflightReport | None = None
        self.warm_up_seconds: float | None = None
        self._built_models: dict | None = None
        self._k = 1   # steps per compiled call of the feed in use (set by fit / verify)
        self._paths: dict[int, pathchoice.Path] = {}   # the compiled path per batch size (mode="auto" times it)
        self.path: pathchoice.Path | None = None        # the path of the built step
        self._online = OnlineSteps(self._built_for)

    @property
    def strategy(self):
        return self.assembly.strategy

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def models(self) -> dict:
        """The trained models by name (built on first use when given as factories)."""
        if self._built_models is None:
            self._built_models = self.assembly.models(self.precision or Precision("float32", "default"),
                                                      distributed=True)
        return self._built_models

    @property
    def run_mode(self) -> str:
        """The compiled path the run uses: `mode` (as auto chose it), unless precision="auto" chose bfloat16
        as a plain graph."""
        return (self.precision and self.precision.mode) or (self.path and self.path.mode) or self.mode

    def build(self, feed: feeding.Feed, resume_from: str | None = None) -> Engine:
        """Resolve the precision, build the models (factories) and optimizers, and set up the compiled step
        for `feed`'s batch size. fit() and verify() call it; call it first to read `trainer.precision`.
        `resume_from`: a checkpoint folder whose recorded precision `auto` adopts."""
        if self.engine is not None:
            if self.engine.global_batch_size == feed.batch_size:
                return self.engine
            if int(self.engine.steps.numpy()) or self._online.engine is not None:
                raise UsageError(f"this Trainer trained with batch size {self.engine.global_batch_size}; "
                                 f"got {feed.batch_size}: use a new Trainer for another batch size")
            self.engine = None   # built for evaluate/predict only: build again for this batch size
        recorded = checkpoint.recorded_precision(resume_from) if resume_from else None
        self.path = self._path_for(feed)
        k = self.path.steps_per_call
        with phases.phase("precision auto: timing the step in float32 and bfloat16"):   # said only if slow
            self.precision = autoprecision.decide(self.options.precision, self.path.mode, self.assembly,
                                                  lambda: next(iter(feed.dataset.take(1))), feed.batch_size, k,
                                                  built=self._built_models is not None, recorded=recorded)
        self.assembly.check_policy(self.models, self.precision)
        self.engine = self.assembly.engine(self.precision, self.run_mode, feed.batch_size, self.models,
                                           self.assembly.optimizers(self.precision, distributed=True), distributed=True)
        return self.engine

    def _rechecks(self, feed: feeding.Feed) -> tuple:
        """Checks of the cached auto decisions (path, precision) against the run's own steady step."""
        path, precision = self.path, self.precision
        key = autoprecision.cache_key(self.assembly, feed.batch_size, self._k, path.mode)
        return (lambda summary: pathchoice.recheck(path, summary),
                *([lambda summary: autoprecision.recheck(precision, key, summary)]
                  if self.options.precision == "auto" and self.assembly.factories else []))

    def _path_for(self, feed: feeding.Feed) -> pathchoice.Path:
        """The compiled path and K for feed's batch size: as asked, or timed once on its first batches."""
        if feed.batch_size not in self._paths:
            with phases.phase("compiled path auto: timing XLA and graph steps"):   # said only if slow
                self._paths[feed.batch_size] = pathchoice.resolve(self.mode, self.options.steps_per_call,
                                                                  self.options.precision, self.assembly, feed)
        return self._paths[feed.batch_size]

    def feed(self, x, y=None, *, batch_size: int | None = None, steps_per_epoch: int | None = None,
             source: str | None = None, sample_weight=None) -> feeding.Feed:
        """The training stream fit() would use (K batches stacked per element when steps_per_call > 1);
        fit(), verify() and build() accept it in place of x, so data is loaded once."""
        if isinstance(x, feeding.Feed):
            return x
        def make(k):
            return feeding.training_feed(x, y, batch_size=batch_size, steps_per_call=k, seed=self.options.seed,
                                         steps_per_epoch=steps_per_epoch, source=source, sample_weight=sample_weight)
        probe = make(1)
        input_checks.features(probe.dataset.element_spec, self.mode, "training")
        k = self._path_for(probe).steps_per_call
        return probe if k == 1 else make(k)

    def preflight(self, first_call) -> preflight.PreflightReport:
        """Compare compiled and eager losses and gradients on the first batch of `first_call` (an element of
        the feed; fit calls this before training); raise PreflightError (the one line) when they disagree.
        Changes no variable. Meanwhile the training call compiles with updates off, so the two compiles overlap
        (not under float16, whose loss scaler has no such switch, nor under a strategy)."""
        overlap = not self.engine.loss_scaling and self.strategy is None   # strategy.run's threads stay alone
        try:
            self.preflight_report = preflight.run(self.engine, first_call, self._k, self.precision.name, overlap)
        except PreflightError as e:
            self.preflight_report = e.report
            raise
        self.warm_up_seconds = self.preflight_report.warm_up_seconds
        return self.preflight_report

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
        self._k = self._path_for(feed).steps_per_call
        return verifying.twin_of(engine, self.assembly, list(feed.dataset.take(math.ceil(steps / self._k))),
                                 self.precision, self._k)

    def fit(self, x=None, y=None, *, batch_size: int | None = None, epochs: int = 1, verbose: bool = True,
            callbacks: Sequence[Callback] = (), validation_data=None, validation_batch_size: int | None = None,
            validation_steps: int | None = None, steps_per_epoch: int | None = None, steps: int | None = None,
            run_dir: str | None = None, checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
            resume: bool = False, profile_steps: str | None = None, summary_every: int | None = None,
            deterministic: bool = False, sample_weight=None, class_weight=None) -> FitResult:
        """Train; Keras' arguments plus fastcore's few. Returns FitResult(history, summary, run_dir).

        x, y: numpy arrays (in-memory fast path), or x a tf.data.Dataset of batches (tuples or dicts) and
          y None. validation_data: (x_val, y_val) arrays or a dataset of batches; every example counts
          exactly once (validation_steps: only that many batches; an endless dataset needs it). epochs,
          or steps (total optimizer steps); steps_per_epoch for a dataset of unknown length.
        run_dir: where TensorBoard scalars, the profile trace, checkpoints and summary.json go (None: no
          files). checkpoint_dir defaults to <run_dir>/checkpoints; checkpoint_every in steps (default: an
          epoch); resume continues from its latest checkpoint. profile_steps "A:B" traces steps A..B.
        Steps are the optimizer's, over every fit of this Trainer: a second fit trains `epochs` more (as Keras),
          ckpt-N holds step N; with resume, epochs/steps count from the run's first step.
        deterministic: TensorFlow op determinism (a resumed run then ends bit-identical). The run directory
        is locked while fit runs; SIGINT/SIGTERM stop after the call in flight with a checkpoint (Interrupted).
        Raises UsageError/DataError for bad input, PreflightError, NonFiniteError (with .summary),
        CheckpointMismatch, Interrupted; all with one-line messages. `run()` takes every option as a record.
        """
        options = FitOptions(epochs=epochs, steps=steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                             validation_batch_size=validation_batch_size, validation_steps=validation_steps,
                             run_dir=run_dir, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             resume=resume, profile_steps=profile_steps, summary_every=summary_every,
                             deterministic=deterministic, verbose=verbose)
        return self.run(x, y, options, validation_data=validation_data, callbacks=callbacks,
                        sample_weight=sample_weight, class_weight=class_weight)

    def run(self, x, y=None, options: FitOptions = FitOptions(), *, validation_data=None,
            callbacks: Sequence[Callback] = (), sample_weight=None, class_weight=None) -> FitResult:
        """fit() with its options as one record (fastcore.options.FitOptions), including the caller's
        summary head, identity extras and output stream; the CLI trains through this."""
        with phases.speaking(options.out) if options.verbose else contextlib.nullcontext():   # slow phases said
            return self._run(x, y, options, validation_data, callbacks, sample_weight, class_weight)

    def _run(self, x, y, options, validation_data, callbacks, sample_weight, class_weight) -> FitResult:
        self.warm_up_seconds = None
        x, sample_weight = sample_weights.with_class_weight(x, y, sample_weight, class_weight)
        feed = self.feed(x, y, batch_size=options.batch_size, steps_per_epoch=options.steps_per_epoch,
                         source=options.train_source, sample_weight=sample_weight)
        self._k = self._path_for(feed).steps_per_call
        if self.assembly.loss is not None:
            loss_steps.unpack(feed.dataset.element_spec)   # the same check as each step's, before the first one
        engine = self.build(feed, resume_from=options.checkpoint_folder if options.resume else None)
        if threads.probing():   # a child of fastcore.threads.choose: time this step, write nothing, end
            threads.answer(engine, feed, self._k)
        run = Run(engine, feed, self._k, self.precision, self.run_mode, options, self.path.reason,
                  strategy=self.strategy, identity_records=(self.options,))
        run.evaluation = input_checks.before_training(engine, feed, self._k, validation_data, options,
                                                      self.run_mode, fastcore_loss=self.assembly.loss is not None)
        epochs = options.epochs if options.steps is None else -(-options.steps // feed.steps_per_epoch)
        callbacks = keras_callbacks.adapt(callbacks, engine, epochs=epochs, steps_per_epoch=feed.steps_per_epoch)
        if self.options.preflight and self.run_mode != "eager":
            run.preflight = self.preflight
        run.warm_up_seconds = lambda: self.warm_up_seconds
        run.rechecks = self._rechecks(feed)
        return run.fit(callbacks)

    # -- Keras' evaluate and predict ----------------------------------------------------------------------
    def evaluate(self, x=None, y=None, batch_size: int | None = None, sample_weight=None, return_dict: bool = True):
        """Keras' evaluate: the loss and metrics over every example exactly once, compiled (XLA under
        mode="xla"); arrays (x, y) or a dataset of batches. Before any training it builds the step."""
        engine = self.engine or self.build(self.feed(x, y, batch_size=batch_size, sample_weight=sample_weight))
        return inference.evaluate(engine, x, y, batch_size=batch_size, sample_weight=sample_weight,
                                  return_dict=return_dict)

    def predict(self, x, batch_size: int | None = None, model: str | None = None):
        """Keras' predict: every example's outputs in order (numpy), one compiled forward per input shape;
        `model` names one of several models. Needs the step built (fit, evaluate or train_on_batch first)."""
        if self.engine is None:
            raise UsageError("predict needs the trained models: call fit(), evaluate() or train_on_batch() first")
        return inference.predict(self.engine, x, batch_size=batch_size, model=model)

    # -- steps on batches the caller makes ---------------------------------------------------------------
    def train_on_batch(self, batch) -> dict[str, float]:
        """One compiled, guarded optimizer step on `batch`, for loops that make each batch themselves (RL,
        active learning, curricula). `batch` is what a fit element holds: (x, y[, sample_weight]) with loss=,
        whatever your step takes with step=. The first call builds the step (and runs the pre-flight); later
        calls of the same shape reuse it. Returns the step's logs as floats; raises NonFiniteError when a
        loss or gradient was not finite (no weight changed)."""
        return self._online(batch)

    def save(self, directory: str) -> str:
        """Checkpoint the models, optimizers and step counter into `directory` (temp files, then rename)."""
        return self._online.save(directory)

    def restore(self, directory: str) -> int:
        """Load the newest intact checkpoint of `directory` (another run's is refused); returns its step.
        Before any step it is loaded when the first train_on_batch builds the step."""
        return self._online.restore(directory)

    def _built_for(self, batch):
        """(engine, precision, identity) for steps on given batches; builds (and pre-flights) on `batch`."""
        if self.engine is None:
            if batch is None:
                raise NothingBuilt()
            self.build(feeding.batch_feed(batch))
            if self.options.preflight and self.run_mode != "eager":
                self._k = 1
                self.preflight(batch)
        identity = {**engine_identity(self.engine, (self.options,), self.engine.global_batch_size, 1),
                    "data": "batches given one at a time"}
        return self.engine, self.precision.name, identity

