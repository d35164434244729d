"""The training step: a user's Python step function, compiled or run eagerly, with fastcore's guarantees.

Who owns what. The user's step function computes losses and gradients with its own GradientTape and
returns them in an `Update`; it never calls `apply_gradients`. fastcore owns everything after that, on
the compiled path and the eager twin alike (they call the very same Python code):
  - one finiteness check across all of the step's losses and gradients before any optimizer applies
    anything, so a non-finite step changes no variable of any model, moving statistics and the training
    metrics included (float32/bfloat16: the run stops; float16: every optimizer's loss scaler skips the
    step and lowers its scale); the step's other logs are diagnostics, not checked (a NaN precision on a
    batch without a positive prediction stops nothing). A K-step call may check once for all its steps
    and run them again checked one by one when that check fails (train_call_many): the same outcome;
  - a call's logs are the means over its applied steps (what its steps computed when none was), and the
    loop weighs a call by them: a skipped step is left out of every epoch figure;
  - float16 loss scaling per optimizer (`ctx.scale(loss, name)`; a step that forgets it is refused);
  - the step counter, the K-step walker (K stacked batches inside one compiled call: a tf.data iterator
    cannot live inside XLA), and the trace ledger that names any retrace.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tensorflow as tf

from fastcore.engine import held_state, twin_random
from fastcore.errors import UsageError

MODES = ("xla", "graph", "eager")
DEFAULT_MAX_SHAPES = 8   # input shapes a compiled function may be compiled for (see TraceLedger)


@dataclasses.dataclass
class Update:
    """What a step function returns.

    loss:      a scalar loss, or a dict of named scalar losses (each is logged as train_<name>).
    gradients: for one optimizer, pairs (gradient, variable) as for `apply_gradients`, e.g.
               `zip(grads, model.trainable_variables)`; for several, a dict optimizer name -> pairs.
    logs:      other scalars to log (means over each compiled call), e.g. {"accuracy": acc}; diagnostics:
               a NaN among them is reported at the epoch's end, it does not stop the run.
    """
    loss: Any
    gradients: Any
    logs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class StepContext:
    """Handed to the step function on every call: models, optimizers, mode and helpers.

    models / optimizers: dicts by name (`ctx.model` / `ctx.optimizer` when there is one).
    training:            False only in fastcore's pre-flight check; pass it to your models
                         (`model(x, training=ctx.training)`) so random layers stay quiet there.
    global_batch_size:   divide summed per-example losses by it (stays right under tf.distribute).
    example_weights:     in evaluation, the batch's [B] example weights (0 on padded rows), e.g. for the
                         sample_weight of stateful metrics; None in training.
    """

    def __init__(self, engine: "Engine", training: bool):
        self._engine = engine
        self.models, self.optimizers = engine.models, engine.optimizers
        self.training = training
        self.global_batch_size = engine.global_batch_size
        self.scaled: set[str] = set()
        self.example_weights = None
        self._draws = 0

    @property
    def model(self):
        return self._engine.model

    @property
    def optimizer(self):
        return self._engine.optimizer

    def scale(self, loss, optimizer: str | None = None):
        """`loss` times the float16 loss scale of `optimizer` (a no-op otherwise): take gradients of this."""
        name = optimizer or _only_name(self.optimizers, "optimizer")
        if name not in self.optimizers:
            raise UsageError(f"ctx.scale(loss, {name!r}): no optimizer named {name!r}; "
                             f"the optimizers are {', '.join(self.optimizers)}")
        self.scaled.add(name)
        if self._engine.loss_scaling:
            return self.optimizers[name].scale_loss(loss)
        return loss

    def seed(self) -> tf.Tensor:
        """A fresh int64 [2] seed for fastcore.random: distinct per call in a step and per step; the same
        compiled and eager; resumes exactly (it derives from the checkpointed step counter)."""
        self._draws += 1
        seed = tf.cast(self._engine.replica_seed(), tf.int64)
        if not self.training:   # the pre-flight's seeds must not depend on a counter a warm-up call moves
            return tf.stack([seed, tf.constant(self._draws, tf.int64)])
        return tf.stack([seed, self._engine.steps * 1024 + self._draws])

    def call(self, model, *args):
        """`model(*args, training=ctx.training)` when the model takes `training`, else `model(*args)`."""
        return call_model(model, *args, training=self.training)

    def regularization(self, model=None):
        """The model's regularization losses (`model.losses`), scaled for the global batch; 0 if none."""
        model = model if model is not None else self.model
        losses = list(getattr(model, "losses", None) or [])
        if not losses:
            return tf.constant(0.0)
        return tf.nn.scale_regularization_loss(tf.add_n([tf.cast(v, tf.float32) for v in losses]))


def call_model(model, *args, training: bool):
    """Call a Keras model or any callable: pass `training=` only when its call signature accepts it."""
    if _accepts_training(model):
        return model(*args, training=training)
    return model(*args)


def _accepts_training(model) -> bool:
    import keras
    if isinstance(model, keras.Layer):
        return True
    fn = model.__call__ if not inspect.isfunction(model) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "training" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _only(d: dict, what: str):
    return d[_only_name(d, what)]


def _only_name(d: dict, what: str) -> str:
    if len(d) != 1:
        raise UsageError(f"there are {len(d)} {what}s ({', '.join(d)}): name the one you mean")
    return next(iter(d))


def describe_argument(value) -> str:
    """`float32[500, 28]` for a tensor (or each leaf of a structure); type and value for anything else."""
    leaves = tf.nest.flatten(value)
    if len(leaves) != 1 or leaves[0] is not value:
        return "(" + ", ".join(describe_argument(v) for v in leaves) + ")"
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{tf.as_dtype(value.dtype).name}{tf.TensorShape(value.shape).as_list()}"
    return f"{type(value).__name__} {value!r}"


@dataclasses.dataclass
class TraceLedger:
    """How often each compiled function was traced, and with which input signature (one entry per argument).

    A function is compiled for at most `max_shapes` input signatures: the trace of one more raises a
    UsageError (one line) before it compiles, so data whose shapes vary without bound fails at its first
    shape past the cap instead of compiling again and again. With `varying_shapes` (the data's shapes vary
    by design), a trace for a signature not seen before is a compile for a new shape, not a retrace.
    """
    signatures: dict[str, list[tuple[str, ...]]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    arg_names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    max_shapes: int = DEFAULT_MAX_SHAPES
    varying_shapes: bool = False

    def __post_init__(self):
        if not isinstance(self.max_shapes, int) or self.max_shapes < 1:
            raise UsageError(f"max_shapes={self.max_shapes!r} must be a positive integer")

    def record(self, name: str, *args, names: tuple[str, ...] = ()) -> None:
        signature = tuple(describe_argument(a) for a in args)
        seen = self.signatures[name]
        if signature not in seen and len(set(seen)) >= self.max_shapes:
            labels = names or self.arg_names.get(name, ())
            shown = ", ".join(f"{label}: {sig}" for label, sig in zip(labels, signature)) or ", ".join(signature)
            raise UsageError(f"{name} would compile for shape {len(set(seen)) + 1} ({shown}), beyond "
                             f"max_shapes={self.max_shapes}: pad the data to a few fixed lengths "
                             f"(bucket_by_sequence_length with pad_to_bucket_boundary=True, or padded_batch with "
                             f"padded_shapes), or raise max_shapes")
        seen.append(signature)
        if names:
            self.arg_names[name] = tuple(names)

    def counts(self) -> dict[str, int]:
        """Traces per function, the training call first (the evaluation call may be traced before it)."""
        return {name: len(self.signatures[name]) for name in self._ordered()}

    def shapes(self) -> dict[str, int]:
        """How many input signatures (shapes) each function was compiled for."""
        return {name: len(set(self.signatures[name])) for name in self._ordered()}

    def _ordered(self) -> list[str]:
        return sorted(self.signatures, key=lambda name: (name != "train", list(self.signatures).index(name)))

    def retraces(self) -> list[str]:
        """One line per trace after a function's first: which arguments changed from the trace before."""
        lines = []
        for name, sigs in self.signatures.items():
            labels = self.arg_names.get(name, ())
            for n, (before, after) in enumerate(zip(sigs, sigs[1:]), start=2):
                if self.varying_shapes and after not in sigs[:n - 1]:
                    continue   # the first compile for one of the data's shapes
                changed = [f"{labels[i] if i < len(labels) else f'argument {i}'}: {a} -> {b}"
                           for i, (a, b) in enumerate(zip(before, after)) if a != b]
                if len(before) != len(after):
                    changed.append(f"{len(before)} -> {len(after)} arguments")
                lines.append(f"{name} traced {n} times: " + ("; ".join(changed) or
                             f"same arguments ({', '.join(after)}): a new tf.function or changed Python state"))
        return lines


StepFn = Callable[[Any, StepContext], Update]
EvalFn = Callable[[Any, StepContext], Mapping[str, Any]]


class Engine:
    """Compiled train/eval calls for one step function over named models and optimizers.

    `step_fn(batch, ctx) -> Update`, or phases: a list of step functions, each optionally as (fn, repeat),
    whose updates apply in turn within one step (e.g. [(critic_step, 3), generator_step]: the critic
    updated 3 times per generator update, each update guarded);
    `eval_fn(batch, ctx) -> {name: per-example [B] values}` (optional).
    `mode`: xla (tf.function(jit_compile=True)), graph (plain tf.function) or eager (the reference twin).
    `unroll_steps`: a K-step call traces its K steps one after another instead of as a tf.while_loop (see
    _steps: what XLA:CPU needs for a convolutional model).
    """

    def __init__(self, models: dict, optimizers: dict, step_fn: StepFn, *, eval_fn: EvalFn | None = None,
                 mode: str = "xla", global_batch_size: int, seed: int = 0, loss_scaling: bool = False,
                 max_shapes: int = DEFAULT_MAX_SHAPES, unroll_steps: bool = False):
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.models, self.optimizers, self.mode, self.unroll_steps = models, optimizers, mode, unroll_steps
        self.step_fn, self.eval_fn = step_fn, eval_fn
        self.global_batch_size, self.seed, self.loss_scaling = global_batch_size, seed, loss_scaling
        self.ledger = TraceLedger(max_shapes=max_shapes)
        self.loss_names: tuple[str, ...] = ()   # the step's losses (not its other logs), known once traced
        # Steps taken (skipped ones included), steps whose every update was applied, and the first step
        # whose loss or gradient was not finite (-1: none). They live in the graph: the loop reads them per call.
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps")
        self.applied = tf.Variable(0, dtype=tf.int64, trainable=False, name="applied_steps")
        self.first_non_finite_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="first_non_finite_step")
        # Off only while the pre-flight compiles the training call beside its own check: the call then
        # runs but applies nothing, counts no step and changes no model variable.
        self.updates_on = tf.Variable(True, trainable=False, name="updates_on")
        # K-step calls checked once and run again under the per-step guard (train_call_many): not state.
        self.replayed_calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="replayed_calls")
        self._build_optimizers()
        for optimizer in optimizers.values():
            _refuse_inside_step(optimizer)
        self._log_names: tuple[str, ...] | None = None
        self._eval_names: tuple[str, ...] | None = None
        self.train_one = self._compile(self._trace_counted("train", self.train_call_one))
        self._many: dict[str, Callable] = {}   # the K-step calls, compiled when first run (_compiled_many)
        self._calls_checked: bool | None = None   # whether K-step calls are checked once (calls_checked_once)
        self._met_non_finite_state = False   # a call found the state non-finite before it ran (CALL_NOT_READY)
        self.evaluate = self._compile(self._trace_counted("eval", self.eval_call))

    @property
    def step_fn(self):
        """The user's step function (or list of phases); setting it re-reads the phases."""
        return self._step_fn

    @step_fn.setter
    def step_fn(self, step_fn) -> None:
        self._step_fn, self.phases = step_fn, phases(step_fn)

    # -- state ---------------------------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        """Optimizer slots must exist before the first trace: variables cannot be created inside XLA.
        Optimizer `name` updates model `name`'s variables; a lone optimizer updates every model's."""
        for name, optimizer in self.optimizers.items():
            if hasattr(optimizer, "build") and not getattr(optimizer, "built", False):
                optimizer.build(list(self.variables_for(name)))

    def variables_for(self, optimizer_name: str) -> tuple:
        if len(self.optimizers) == 1:
            return tuple(v for m in self.models.values() for v in m.trainable_variables)
        if optimizer_name not in self.models:
            raise UsageError(f"optimizer {optimizer_name!r} has no model of the same name: with several "
                             f"optimizers, name each after the model it updates ({', '.join(self.models)})")
        return tuple(self.models[optimizer_name].trainable_variables)

    @property
    def model(self):
        """The model, when there is one."""
        return _only(self.models, "model")

    @property
    def optimizer(self):
        """The optimizer, when there is one."""
        return _only(self.optimizers, "optimizer")

    @property
    def model_variables(self) -> list:
        """Every variable of every model (weights and RNG state), in a stable order."""
        return [v for m in self.models.values() for v in m.variables]

    @property
    def state_variables(self) -> list:
        """Everything a step changes: model variables, optimizer variables, the counters."""
        out = self.model_variables
        for optimizer in self.optimizers.values():
            out += list(getattr(optimizer, "variables", None) or [])
        return out + [self.steps, self.applied, self.first_non_finite_step]

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied (float16 overflow skips, or after a non-finite step)."""
        return int(self.steps.numpy()) - int(self.applied.numpy())

    def replica_seed(self):
        """The first half of ctx.seed(): the run's seed (a distributed engine mixes in the replica)."""
        return self.seed

    # -- one step ------------------------------------------------------------------------------------
    def compute(self, batch, training: bool = True, phase: int = 0, draws: int = 0) -> tuple[dict, dict]:
        """Run the user's step (phase `phase`): ({log name: scalar}, {optimizer name: [(grad, var)]});
        applies nothing. `draws`: ctx.seed()'s first draw number (distinct per repeat within a step)."""
        ctx = StepContext(self, training)
        ctx._draws = draws
        with twin_random.xla_draws(self.mode == "xla"):   # the eager twin draws what XLA draws
            with _user_step():
                update = self.phases[phase][0](batch, ctx)
        if not isinstance(update, Update):
            raise UsageError(f"the step function returned {type(update).__name__}: return "
                             f"fastcore.Update(loss=..., gradients=zip(grads, variables))")
        logs = _losses(update.loss)
        self.loss_names = tuple(logs)   # summed over replicas under tf.distribute; other logs are averaged
        for name, value in dict(update.logs).items():
            logs[name] = _scalar(value)
        grads = self._pairs(update.gradients)
        if self.loss_scaling:
            forgot = sorted(set(grads) - ctx.scaled)
            if forgot:
                raise UsageError(f"float16: the step took gradients for {', '.join(forgot)} without "
                                 f"ctx.scale(loss, name): take gradients of the scaled loss")
        return logs, grads

    def _pairs(self, gradients) -> dict[str, list]:
        if isinstance(gradients, Mapping):
            unknown = [n for n in gradients if n not in self.optimizers]
            if unknown:
                raise UsageError(f"the step returned gradients for {', '.join(map(repr, unknown))}: "
                                 f"no such optimizer (the optimizers are {', '.join(self.optimizers)})")
            by_name = {name: list(pairs) for name, pairs in gradients.items()}
        else:
            by_name = {_only_name(self.optimizers, "optimizer"): list(gradients)}
        out = {}
        for name, pairs in by_name.items():
            allowed = {id(v) for v in self.variables_for(name)}
            for _, v in pairs:
                if id(v) not in allowed:
                    raise UsageError(f"the step's gradients for optimizer {name!r} include {v.name}, "
                                     f"which is not a trainable variable of the model it updates")
            out[name] = [(g, v) for g, v in pairs if g is not None]
        return out

    def train_step(self, batch, guarded: bool = True) -> tuple[dict, tf.Tensor]:
        """One step on one batch: compute, check, apply (each phase in turn, each repeat guarded; the step
        counts once). Returns ({name: scalar} (losses and logs; a repeated phase's from its last repeat),
        whether every update of the step was applied). Unguarded (train_call_many checks its call once
        instead), every update is applied."""
        logs, all_applied = {}, tf.constant(True)
        calls = [index for index, (_, repeat) in enumerate(self.phases) for _ in range(repeat)]
        for n, index in enumerate(calls):
            if not guarded:
                phase_logs, grads = self.compute(batch, phase=index, draws=n * DRAWS_PER_CALL)
                if n == 0:
                    self.steps.assign_add(1)
                self._apply(grads)
                logs.update(phase_logs)
                continue
            held = self._hold_model_state()
            phase_logs, grads, finite = self.compute_checked(batch, index, draws=n * DRAWS_PER_CALL)
            if n == 0:
                self.steps.assign_add(tf.cast(self.updates_on, tf.int64))
            if self.loss_scaling:
                applied = self._apply_scaled(grads, finite)
            else:
                applied = self._apply_if_finite(finite, grads)
            self._put_back_unless(applied, held)
            all_applied = tf.logical_and(all_applied, applied)
            logs.update(phase_logs)
        self.applied.assign_add(tf.cast(all_applied, tf.int64))
        return logs, all_applied

    def _hold_model_state(self) -> held_state.Held:
        """The models' non-trainable variables and the training metrics' state before a step (see
        fastcore.engine.held_state): a skipped step's NaN never reaches a metric either."""
        return held_state.hold(self.model_variables + self._metric_variables())

    def _metric_variables(self) -> list:
        metrics = getattr(self.step_fn, "metrics", None)
        return list(metrics.variables) if metrics else []

    def _put_back_unless(self, applied, held: held_state.Held) -> None:
        """A step whose update is not applied (a non-finite step, a float16 overflow skip, the pre-flight's
        warm-up with updates off) leaves every model variable as it was."""
        held_state.put_back_unless(applied, held)

    def compute_checked(self, batch, phase: int = 0, draws: int = 0) -> tuple[dict, dict, tf.Tensor]:
        """The step's logs and gradients, and whether every loss and gradient is finite."""
        logs, grads = self.compute(batch, phase=phase, draws=draws)
        return logs, grads, _all_finite(self.guarded(logs), [g for pairs in grads.values() for g, _ in pairs])

    def guarded(self, logs: dict) -> list:
        """The logs the finiteness guard checks: the step's losses. Its other logs are diagnostics (a NaN
        there is reported at the epoch's end, see fastcore.engine.loop)."""
        return [logs[name] for name in self.loss_names]

    def _apply(self, grads) -> None:
        for name, pairs in grads.items():
            self.optimizers[name].apply_gradients(pairs)

    def _apply_scaled(self, grads, finite) -> tf.Tensor:
        """Each LossScaleOptimizer skips a step whose gradients are not finite and lowers its scale. A NaN
        anywhere poisons every optimizer's gradients, so all of them skip together: applied iff `finite`."""
        poison = tf.where(finite, 0.0, float("nan"))
        for name, pairs in grads.items():
            self.optimizers[name].apply_gradients([(g + tf.cast(poison, g.dtype), v) for g, v in pairs])
        return finite

    def _apply_if_finite(self, finite, grads) -> tf.Tensor:
        """Apply only while every step so far was finite: a NaN never reaches any weight. Returns whether
        the update was applied."""
        healthy = self.first_non_finite_step < 0
        on = self.updates_on

        def apply():
            self._apply(grads)
            return tf.constant(True)

        def skip():
            record = tf.logical_and(tf.logical_and(healthy, on), tf.logical_not(finite))
            self.first_non_finite_step.assign(tf.where(record, self.steps, self.first_non_finite_step))
            return tf.constant(False)

        applied = tf.logical_and(tf.logical_and(finite, healthy), on)
        tf.cond(applied, apply, skip)
        return applied

    def _check_weights(self) -> None:
        """Once per compiled call, the updated weights must be finite too: an update can overflow although
        its gradient was finite (a learning rate of 1e39). The loop then stops before any checkpoint is
        written, so a checkpoint called good never holds NaN/Inf. One sum over the weights per call."""
        weights = [tf.reduce_sum(tf.cast(v, tf.float32)) for v in self.model_variables if v.trainable]
        if not weights:
            return
        finite = tf.math.is_finite(tf.add_n(weights))
        first = self.first_non_finite_step
        first.assign(tf.where(tf.logical_or(finite, first >= 0), first, self.steps))

    # -- compiled calls ------------------------------------------------------------------------------
    def log_names(self, batch_spec) -> tuple[str, ...]:
        """The names a step logs, found by tracing the step function once in a throwaway graph."""
        if self._log_names is None:
            fn = tf.function(lambda b: {k: v for i in range(len(self.phases)) for k, v in self.compute(b, phase=i)[0].items()},
                             autograph=False)
            self._log_names = tuple(fn.get_concrete_function(batch_spec).structured_outputs)
        return self._log_names

    def train_call_one(self, batch) -> dict:
        logs, _ = self.train_step(batch)
        self._check_weights()
        return logs

    def train_many(self, batches) -> dict:
        """K optimizer steps over stacked batches (every leaf [K, B, ...]); returns each log's mean over the
        applied steps (over all K when none was: what a wholly skipped call computed). The loop weights a
        call by its applied steps (the change of `applied`), so a skipped step is in no epoch figure.

        Checked once per call, not per step, when it can be (see `checks_per_call`): the compiled call
        (train_call_checked) keeps its state, runs its K steps unguarded, then checks its losses and every
        model and optimizer variable once. Clean, it is done; else its state is put back and the same K
        batches run again with the guard on every step (train_call_guarded; `replayed_calls` counts these), so
        every outcome is the per-step guard's. A NaN or Inf in a gradient reaches the optimizer's state or the
        weights, and from there the check: nothing makes it finite again (gradient clipping by value and weight
        constraints could, so they keep the per-step guard). MNIST MLP B=32 K=125 under XLA, interleaved in
        one process (2-core Xeon): 1.09x the examples/s on 2 threads, 1.15x on 1; the matmul-bound HIGGS MLP
        (B=500, K=10) within noise (0.96x and 1.20x in two runs).

        The replay is its own compiled function, traced and compiled only when a call first needs it: one
        loop body in the first compile, not two (HIGGS MLP, K=10, 2-core Xeon, first call with its compile:
        XLA 4.6-4.8 s with both bodies, 1.8-2.0 s with one; a plain graph 2.7-3.2 s against 1.0-1.2 s).
        Reading the call's verdict costs one scalar per call, which the loop reads per call anyway."""
        return self._many_steps(batches, self._compiled_many)

    def train_call_many(self, batches) -> dict:
        """train_many run eagerly, the same checks in the same order (the eager reference twin's call)."""
        return self._many_steps(batches, lambda kind: self.train_call_checked if kind == "checked"
                                else self.train_call_guarded)

    def train_many_function(self):
        """The compiled function a clean K-step call runs (for its concrete graph)."""
        return self._compiled_many("checked" if self.calls_checked_once() else "guarded")

    def _many_steps(self, batches, function: Callable[[str], Callable]) -> dict:
        if not self.calls_checked_once() or self._met_non_finite_state:
            return function("guarded")(batches)
        logs, verdict = function("checked")(batches)
        verdict = int(verdict)
        if verdict in (CALL_CLEAN, CALL_UPDATES_OFF):
            return logs
        if verdict == CALL_PUT_BACK:
            self.replayed_calls.assign_add(1)
        else:   # CALL_NOT_READY: a state non-finite on purpose would make every checked call run twice
            self._met_non_finite_state = True
        return function("guarded")(batches)

    def calls_checked_once(self) -> bool:
        """Whether this engine's K-step calls run unguarded and are checked once (checks_per_call, and a float
        variable to check), decided on first use."""
        if self._calls_checked is None:   # the engine's optimizers, constraints and state are fixed once built
            self._calls_checked = self.checks_per_call() and any(
                tf.as_dtype(v.dtype).is_floating for v in self.state_variables)
        return self._calls_checked

    def _compiled_many(self, kind: str) -> Callable:
        """The compiled K-step call `kind` (checked | guarded), made on first use. The guarded one is the
        trace ledger's "train" where calls are not checked once, else its "train replay"."""
        if kind not in self._many:
            fn = self.train_call_checked if kind == "checked" else self.train_call_guarded
            name = "train replay" if kind == "guarded" and self.calls_checked_once() else "train"
            self._many[kind] = self._compile(self._trace_counted(name, fn))
        return self._many[kind]

    def train_call_guarded(self, batches) -> dict:
        """K steps over stacked batches, each under the per-step guard (see train_many)."""
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), batches)
        return self._steps(batches, self.log_names(spec), guarded=True)

    def train_call_checked(self, batches) -> tuple[dict, tf.Tensor]:
        """K steps over stacked batches unguarded, then one check (see train_many): (logs, verdict), the
        verdict one of CALL_CLEAN, CALL_PUT_BACK (not finite: the state is as before the call, replay it
        guarded), CALL_NOT_READY (the state held a non-finite value before the call, e.g. a variable that is
        Inf on purpose, which would make every call replay: the state is put back, the call runs guarded, and
        so do the engine's later calls) or CALL_UPDATES_OFF (the pre-flight compiles the call with updates off:
        it ran, and the state is put back).

        The steps run at the call's top level, not inside a tf.cond: XLA:CPU's convolution canonicalization
        visits only the top level (see _steps), so a convnet's unrolled steps in a branch compiled to the same
        slow kernels as its while loop (the text model, 8 steps unrolled: 86 ex/s in a branch, 3,453 at the top level).
        A state not ready then costs one call run twice, once per engine."""
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), batches)
        names = self.log_names(spec)
        checked = [v for v in self.state_variables if tf.as_dtype(v.dtype).is_floating]
        state = self.state_variables + self._metric_variables()
        ready = tf.logical_and(self.first_non_finite_step < 0, tf.math.is_finite(tf.add_n(_sums(checked))))
        before = [tf.identity(v) for v in state]
        logs = self._steps(batches, names, guarded=False)
        clean = tf.math.is_finite(tf.add_n([logs[name] for name in self.loss_names] + _sums(checked)))
        keep = tf.logical_and(tf.logical_and(ready, clean), self.updates_on)

        def put_back():
            for v, value in zip(state, before):
                v.assign(value)
            return tf.where(ready, tf.where(self.updates_on, CALL_PUT_BACK, CALL_UPDATES_OFF), CALL_NOT_READY)
        return logs, tf.cond(keep, lambda: tf.constant(CALL_CLEAN), put_back)

    def checks_per_call(self) -> bool:
        """Whether a K-step call may run its steps unguarded and check once (train_many): not under
        float16 loss scaling (a skipped step is normal there) or tf.distribute (each replica would have to
        agree), nor where an optimizer clips gradients by value or a variable has a constraint: either can
        turn an Inf into a finite number the end-of-call check would not see; nor for a state over
        CALL_CHECK_BYTES, whose copy would double the memory it takes."""
        if self.loss_scaling or not self.single_device:
            return False
        state = self.state_variables + self._metric_variables()
        if sum(tf.TensorShape(v.shape).num_elements() * tf.as_dtype(v.dtype).size for v in state) > CALL_CHECK_BYTES:
            return False
        if any(getattr(o, "clipvalue", None) is not None for o in self.optimizers.values()):
            return False
        return not any(getattr(v, "constraint", None) is not None for m in self.models.values() for v in m.variables)

    single_device = True   # fastcore.engine.distributed's engine says False

    def _steps(self, batches, names, guarded: bool) -> dict:
        """The K-step loop of train_call_many, each step guarded or not: a tf.while_loop, or with
        `unroll_steps` (and K known when traced) the K steps traced one after another. XLA:CPU's convolution
        canonicalization visits only a computation's top level, so a convolution's gradient inside a while
        loop body compiles to element-at-a-time kernels (the BN convnet's K-step loop ran 0.02x a plain
        graph, BENCHMARKS.md); unrolled, every step is top level. Compile time grows with K."""
        leading = tf.nest.flatten(batches)[0].shape[0]
        k = tf.shape(tf.nest.flatten(batches)[0])[0]
        zeros = [tf.constant(0.0) for _ in names]

        def body(i, applied_steps, applied_totals, totals):
            logs, applied = self.train_step(tf.nest.map_structure(lambda t: t[i], batches), guarded=guarded)
            values = [logs[name] for name in names]
            return (i + 1, applied_steps + tf.cast(applied, tf.float32),
                    [t + tf.where(applied, v, 0.0) for t, v in zip(applied_totals, values)],
                    [t + v for t, v in zip(totals, values)])
        loop = (tf.constant(0), tf.constant(0.0), zeros, zeros)
        if self.unroll_steps and leading is not None:
            for _ in range(leading):
                loop = body(*loop)
            _, applied_steps, applied_totals, totals = loop
        else:
            _, applied_steps, applied_totals, totals = tf.while_loop(lambda i, *_: i < k, body, loop)
        if guarded:
            self._check_weights()
        return {name: tf.where(applied_steps > 0, applied_total / tf.maximum(applied_steps, 1.0),
                               total / tf.cast(k, tf.float32))
                for name, applied_total, total in zip(names, applied_totals, totals)}

    def eval_call(self, batch, weights) -> tf.Tensor:
        """[weighted sum of each eval value..., weight sum] for one padded batch (weight 0 on padding)."""
        w = tf.cast(weights, tf.float32)
        ctx = StepContext(self, training=False)
        ctx.example_weights = w
        values = self.eval_fn(batch, ctx)
        self._eval_names = tuple(values)
        sums = [tf.reduce_sum(per_example_values(v) * w) for v in values.values()]
        return tf.stack(sums + [tf.reduce_sum(w)])

    @property
    def eval_names(self) -> tuple[str, ...]:
        return self._eval_names or ()

    def _trace_counted(self, name, fn):
        names = tuple(inspect.signature(fn).parameters)

        def counted(*args):
            if not tf.executing_eagerly():   # Python runs here only while tracing
                self.ledger.record(name, *args, names=names)
            return fn(*args)
        counted.__name__ = fn.__name__
        return counted

    def _compile(self, fn):
        if self.mode == "eager":
            return fn
        # No AutoGraph (as in Keras 3's train step): errors raised while tracing the step keep their type
        # and one-line message; data-dependent branches in a step function use tf.cond / tf.where.
        return tf.function(fn, jit_compile=self.mode == "xla", autograph=False)


CALL_CHECK_BYTES = 1 << 28   # 256 MiB of state: larger models keep the per-step guard (no second copy)
CALL_CLEAN, CALL_PUT_BACK, CALL_NOT_READY, CALL_UPDATES_OFF = range(4)   # train_call_checked's verdicts
DRAWS_PER_CALL = 64   # ctx.seed() draws one phase call may make before the next call's would repeat them


def phases(step_fn) -> list[tuple[Callable, int]]:
    """[(step function, repeat)] from one step function or a list of them (each fn or (fn, repeat))."""
    if callable(step_fn):
        return [(step_fn, 1)]
    out = []
    for item in step_fn or ():
        fn, repeat = item if isinstance(item, tuple) else (item, 1)
        if not callable(fn) or not isinstance(repeat, int) or repeat < 1:
            raise UsageError(f"step phase {item!r}: give a step function or (step function, repeats >= 1)")
        out.append((fn, repeat))
    if not out:
        raise UsageError("step=[]: give a step function, or a list of them (each fn or (fn, repeats))")
    return out


_inside = threading.local()


@contextlib.contextmanager
def _user_step():
    """Marks this thread as running the user's step function (see _refuse_inside_step)."""
    _inside.active = True
    try:
        yield
    finally:
        _inside.active = False


def _refuse_inside_step(optimizer) -> None:
    """An optimizer's apply_gradients called from inside a step function would bypass the finiteness guard,
    loss scaling and the step counter: refuse it in one line (the engine applies what the step returns)."""
    for name in ("apply_gradients", "apply"):
        method = getattr(optimizer, name, None)
        if method is None or getattr(method, "_fastcore_refusing", False):
            continue

        def refusing(*args, _method=method, _name=name, **kwargs):
            if getattr(_inside, "active", False):
                raise UsageError(f"the step function called optimizer.{_name}(): return the gradients in "
                                 f"fastcore.Update(gradients=...) instead, so the finiteness guard, loss scaling and "
                                 f"the step counter see them (several updates per step: step=[(critic_step, n), "
                                 f"generator_step])")
            return _method(*args, **kwargs)
        refusing._fastcore_refusing = True
        setattr(optimizer, name, refusing)


def _losses(loss) -> dict:
    if isinstance(loss, Mapping):
        if not loss:
            raise UsageError("the step returned no loss: Update(loss=...) needs a scalar or a dict of them")
        return {name: _scalar(v) for name, v in loss.items()}
    return {"loss": _scalar(loss)}


def _scalar(value) -> tf.Tensor:
    value = tf.cast(value, tf.float32)
    return value if value.shape.rank == 0 else tf.reduce_mean(value)


def per_example_values(value) -> tf.Tensor:
    """[B] from [B, ...]: the mean over the non-batch axes (losses, metrics, eval values)."""
    value = tf.cast(value, tf.float32)
    if value.shape.rank == 1:
        return value
    if value.shape.rank == 0:
        raise UsageError("a loss or metric returned a scalar: it must return one value per example (a Keras loss "
                         "object, or a callable without reduction)")
    return tf.reduce_mean(tf.reshape(value, [tf.shape(value)[0], -1]), axis=1)


def finiteness_sum(scalars: list, grads: Iterable) -> tf.Tensor:
    """One sum over every loss and gradient: NaN/Inf when any element is (it can only also flag a finite
    sum above float32's max, ~3e38: a broken step anyway). Measured, MNIST MLP B=32 K=50 under XLA:
    214k ex/s vs 153k with an is_finite + reduce_all per gradient tensor."""
    parts = [tf.cast(s, tf.float32) for s in scalars]
    for g in grads:
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        parts.append(tf.reduce_sum(tf.cast(values, tf.float32)))
    return tf.add_n(parts)


def _sums(variables: list) -> list:
    return [tf.reduce_sum(tf.cast(v, tf.float32)) for v in variables]


def _all_finite(scalars: list, grads: Iterable) -> tf.Tensor:
    return tf.math.is_finite(finiteness_sum(scalars, grads))
