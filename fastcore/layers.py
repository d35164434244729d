"""Layers whose compiled and eager runs agree: hashed `Dropout`, and `Dense` with a fast bfloat16 dot.

Keras' own `keras.layers.Dropout` draws a different mask under XLA than eagerly; fastcore's eager twin
draws XLA's (fastcore.engine.twin_random), so the pre-flight and `verify` accept it. `fastcore.layers.Dropout`
is a drop-in replacement whose mask is identical on every path without that help (a plain graph, code
outside fastcore's step).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from fastcore import random


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """Inverted dropout with a mask that is the same compiled and eager (seed: int64 [2])."""
    keep = random.uniform(tf.shape(x, out_type=tf.int64), seed) >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


@keras.saving.register_keras_serializable(package="fastcore")
class Dropout(keras.layers.Layer):
    """Drop-in for keras.layers.Dropout: same semantics, a mask identical compiled and eager.

    The draw counter lives in a Keras SeedGenerator (a variable of the model), so it is checkpointed
    and a resumed run draws the masks the uninterrupted run would have drawn. Registered with Keras, so a
    model holding it saves to `.keras` and loads back (`keras.models.load_model`).
    """

    def __init__(self, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        return dropout(x, self.rate, self.seed_generator.next())

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _in_xla() -> bool:
    """Whether the op being built goes into an XLA-compiled function (tf.function(jit_compile=True))."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


@tf.custom_gradient
def _bf16_dot(x, w):
    """bfloat16 x @ w accumulated and returned in float32, and its gradients the same way.

    XLA on CPU rewrites a bfloat16 dot into a float32 one (1024^2 matmul: 211 GFLOP/s, float32 222);
    a bf16 x bf16 -> f32 BatchMatMulV3 keeps bf16 operands (439-893 GFLOP/s). TensorFlow has no
    kernel for it outside XLA, so only compiled steps take this path.
    """
    def mm(a, b, adj_a=False, adj_b=False):
        return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=tf.float32, adj_x=adj_a, adj_y=adj_b)

    def grad(dy):
        dy = tf.cast(dy, x.dtype)
        return tf.cast(mm(dy, w, adj_b=True), x.dtype), tf.cast(mm(x, dy, adj_a=True), w.dtype)
    return mm(x, w), grad


def matmul(x, w):
    """x @ w in x's dtype; bfloat16 under XLA goes through a bf16 x bf16 -> f32 dot (float32 accumulation)."""
    if x.dtype == tf.bfloat16 and _in_xla():
        return tf.cast(_bf16_dot(x, tf.cast(w, tf.bfloat16)), tf.bfloat16)
    return tf.matmul(x, tf.cast(w, x.dtype))


@keras.saving.register_keras_serializable(package="fastcore")
class Dense(keras.layers.Dense):
    """keras.layers.Dense whose bfloat16 matmul is `matmul` above (same weights, same variables)."""

    def call(self, inputs, training=None):
        if self.compute_dtype != "bfloat16":
            return super().call(inputs, training=training)
        x = matmul(tf.cast(inputs, tf.bfloat16), self.kernel)
        if self.bias is not None:
            x += tf.cast(self.bias, tf.bfloat16)
        return self.activation(x) if self.activation is not None else x
