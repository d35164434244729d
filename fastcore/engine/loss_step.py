"""The step fastcore writes when the user gives a loss: per-example loss, sample weights, regularization, metrics.

A leaf of the engine: it knows Keras losses and the batch layout, nothing of runs, feeds or the Trainer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from fastcore.engine.step import StepContext, Update, per_example_values
from fastcore.errors import UsageError


def per_example_loss(loss) -> Callable:
    """`(y_true, y_pred) -> per-example` from a Keras loss object, a Keras loss name, or a callable."""
    if isinstance(loss, keras.losses.Loss):
        return loss.call   # Loss.call is the unreduced per-example loss (no reduction, no weights)
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if callable(loss):
        return loss
    raise UsageError(f"loss {loss!r} is not a Keras loss or a callable (y_true, y_pred) -> per-example loss")


def unpack(batch):
    """(x, y, sample_weight or None) from a batch, or from a dataset's element_spec (checked up front)."""
    if isinstance(batch, Mapping):
        raise UsageError("with loss=, each element must be (x, y) or (x, y, sample_weight); this dataset yields "
                         "dicts: map it, e.g. ds.map(lambda d: (d['image'], d['label']))")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise UsageError("with loss=, each element must be (x, y) or (x, y, sample_weight)")


def loss_step(model, loss) -> Callable:
    """The step fastcore writes for `loss`: sum of per-example losses / global batch + regularization."""
    loss_fn = per_example_loss(loss)

    def step(batch, ctx: StepContext) -> Update:
        x, y, weights = unpack(batch)
        with tf.GradientTape() as tape:
            out = tf.cast(ctx.call(model, x), tf.float32)
            per = per_example_values(loss_fn(y, out))
            if weights is not None:
                per = per * tf.cast(tf.reshape(weights, [-1]), tf.float32)
            # Sum / global batch (not mean): stays right when tf.distribute splits the batch.
            value = tf.reduce_sum(per) / ctx.global_batch_size + ctx.regularization(model)
            scaled = ctx.scale(value)
        variables = model.trainable_variables
        return Update(value, zip(tape.gradient(scaled, variables), variables))
    return step


def loss_eval(model, loss, metrics: dict) -> Callable:
    """Per-example loss and metrics on a batch, the model in inference mode."""
    loss_fn = per_example_loss(loss)

    def evaluate(batch, ctx: StepContext) -> dict:
        x, y, _ = unpack(batch)
        out = tf.cast(ctx.call(model, x), tf.float32)
        values = {"loss": per_example_values(loss_fn(y, out))}
        values.update({name: per_example_values(fn(y, out)) for name, fn in metrics.items()})
        return values
    return evaluate


def named_metrics(metrics) -> dict:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out = {}
    for fn in metrics:
        if not callable(fn):
            raise UsageError(f"metric {fn!r} is not callable: give (y_true, y_pred) -> per-example values")
        out[getattr(fn, "__name__", None) or getattr(fn, "name", None) or f"metric_{len(out)}"] = fn
    return out
