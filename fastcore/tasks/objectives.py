"""Per-example losses and metrics, by name.

Keras models get Keras' losses; the Keras-free module path gets the same formulas written with
plain TensorFlow ops, so a user who avoids Keras avoids it entirely.
Each returns a [batch] float32 vector, so callers can weight (padding) and sum exactly.
"""
from __future__ import annotations

import keras
import tensorflow as tf

LOSSES = ("mse", "softmax_ce", "sigmoid_ce")
METRICS = ("mse", "accuracy", "binary_accuracy")


def keras_loss(kind: str, reduction: str | None = "sum_over_batch_size") -> keras.losses.Loss:
    """The Keras loss object for `kind` (outputs are logits for the cross-entropies)."""
    return {
        "mse": keras.losses.MeanSquaredError,
        "softmax_ce": lambda reduction: keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction),
        "sigmoid_ce": lambda reduction: keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction),
    }[kind](reduction=reduction)


def _keras_loss(kind: str):
    loss = keras_loss(kind, reduction=None)
    return lambda y, out: tf.reshape(loss(y, out), [-1])


def _plain_loss(kind: str):
    def mse(y, out):
        return tf.reduce_mean(tf.square(out - y), axis=-1)

    def softmax_ce(y, out):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=out)

    def sigmoid_ce(y, out):
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), axis=-1)

    return {"mse": mse, "softmax_ce": softmax_ce, "sigmoid_ce": sigmoid_ce}[kind]


def per_example_loss(kind: str, keras_free: bool):
    """`fn(y, outputs) -> [batch]` loss; outputs are logits for the cross-entropies."""
    return _plain_loss(kind) if keras_free else _keras_loss(kind)


def per_example_metric(kind: str):
    """`fn(y, outputs) -> [batch]`: squared error, or 1.0 where the prediction is right."""
    if kind == "mse":
        return lambda y, out: tf.reduce_mean(tf.square(out - y), axis=-1)
    if kind == "accuracy":
        return lambda y, out: tf.cast(tf.equal(tf.argmax(out, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
    if kind == "binary_accuracy":
        return lambda y, out: tf.reduce_mean(tf.cast(tf.equal(tf.cast(out > 0, tf.float32), y), tf.float32), axis=-1)
    raise ValueError(f"unknown metric {kind!r}")
