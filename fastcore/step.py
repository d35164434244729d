"""The training and evaluation step: one Python function each, compiled or run eagerly.

`train_step` is the only place a gradient is taken. The compiled step (XLA or plain graph) and the
eager reference twin both call it, so they cannot drift apart by construction. `train_steps`
walks K stacked batches inside one call: a tf.data iterator cannot live inside an XLA graph, and
one compiled call per K steps removes K-1 Python round trips.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect

import keras
import tensorflow as tf

from fastcore import objectives

MODES = ("xla", "graph", "eager")


def describe_argument(value) -> str:
    """`float32[500, 28]` for a tensor; type and value for anything else (each new value retraces)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{tf.as_dtype(value.dtype).name}{tf.TensorShape(value.shape).as_list()}"
    return f"{type(value).__name__} {value!r}"


@dataclasses.dataclass
class TraceLedger:
    """How often each compiled function was traced, and with which input signature (one entry per argument)."""
    signatures: dict[str, list[tuple[str, ...]]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    arg_names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def record(self, name: str, *args, names: tuple[str, ...] = ()) -> None:
        self.signatures[name].append(tuple(describe_argument(a) for a in args))
        if names:
            self.arg_names[name] = tuple(names)

    def counts(self) -> dict[str, int]:
        return {name: len(sigs) for name, sigs in self.signatures.items()}

    def retraces(self) -> list[str]:
        """One line per trace after a function's first: which arguments changed from the trace before."""
        lines = []
        for name, sigs in self.signatures.items():
            labels = self.arg_names.get(name, ())
            for n, (before, after) in enumerate(zip(sigs, sigs[1:]), start=2):
                changed = [f"{labels[i] if i < len(labels) else f'argument {i}'}: {a} -> {b}"
                           for i, (a, b) in enumerate(zip(before, after)) if a != b]
                if len(before) != len(after):
                    changed.append(f"{len(before)} -> {len(after)} arguments")
                lines.append(f"{name} traced {n} times: " + ("; ".join(changed) or
                             f"same arguments ({', '.join(after)}): a new tf.function or changed Python state"))
        return lines


class Step:
    """Train/eval steps for one (model, objective, optimizer); `mode` picks how they run."""

    def __init__(self, model, loss: str, metric: str, optimizer, *, keras_free: bool,
                 global_batch_size: int, mode: str = "xla"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.loss_fn = objectives.per_example_loss(loss, keras_free)
        self.metric_fn = objectives.per_example_metric(metric)
        self.metric_name = metric
        self.global_batch_size = global_batch_size
        self.ledger = TraceLedger()
        self.loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # Steps taken (skipped ones included) and the first step whose loss or gradient was not
        # finite (-1: none). Both live in the graph, so the loop reads them once per call, not per step.
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps")
        self.first_non_finite_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="first_non_finite_step")
        # Optimizer slots must exist before the first trace: variables cannot be created inside XLA.
        self.optimizer.build(model.trainable_variables)
        self.train_one = self._compile(self._trace_counted("train", self.train_step))
        self.train_many = self._compile(self._trace_counted("train", self.train_steps))
        self.evaluate = self._compile(self._trace_counted("eval", self.eval_step))

    def train_step(self, x, y):
        """One optimizer step on one batch; returns the loss (data loss + regularization)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            out = tf.cast(self.model(x, training=True), tf.float32)
            # Sum / global batch (not mean): stays right when tf.distribute splits the batch.
            loss = tf.reduce_sum(self.loss_fn(y, out)) / self.global_batch_size
            regularization = self.model.losses
            if regularization:
                loss += tf.nn.scale_regularization_loss(tf.add_n(regularization))
            # A no-op for plain optimizers; the dynamic loss scale under LossScaleOptimizer (float16).
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        self.steps.assign_add(1)
        if self.loss_scaling:   # LossScaleOptimizer skips non-finite steps itself and lowers the scale
            self.optimizer.apply_gradients(zip(grads, variables))
        else:
            self._apply_if_finite(loss, grads, variables)
        return loss

    def _apply_if_finite(self, loss, grads, variables):
        """Apply only while every step so far was finite: a NaN never reaches the weights.

        One sum over all gradients is NaN/Inf when any element is (it can only also flag a finite
        sum above float32's max, ~3e38, a broken step anyway). Measured, MNIST MLP B=32 K=50 under
        XLA: 214k ex/s vs 153k with an is_finite + reduce_all per gradient tensor.
        """
        finite = tf.math.is_finite(loss + tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads]))
        healthy = self.first_non_finite_step < 0

        def apply():
            self.optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        def skip():
            self.first_non_finite_step.assign(tf.where(healthy, self.steps, self.first_non_finite_step))
            return tf.constant(False)

        tf.cond(tf.logical_and(finite, healthy), apply, skip)

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied (float16 overflow skips, or after a non-finite step)."""
        return int(self.steps.numpy()) - int(self.optimizer.iterations.numpy())

    def train_steps(self, xs, ys):
        """K optimizer steps over stacked batches xs [K, B, ...]; returns the mean loss."""
        k = tf.shape(xs)[0]
        total = tf.constant(0.0)
        for i in tf.range(k):
            total += self.train_step(xs[i], ys[i])
        return total / tf.cast(k, tf.float32)

    def eval_step(self, x, y, w):
        """[weighted loss sum, weighted metric sum, weight sum] for one padded batch (w=0 on padding)."""
        out = tf.cast(self.model(x, training=False), tf.float32)
        return tf.stack([tf.reduce_sum(self.loss_fn(y, out) * w),
                         tf.reduce_sum(self.metric_fn(y, out) * w),
                         tf.reduce_sum(w)])

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
        return tf.function(fn, jit_compile=self.mode == "xla")
