"""Model builders: one MLP description, four ways to build it (three Keras APIs and a Keras-free tf.Module).

Every builder gives an object that is callable as `model(x, training=...)`, exposes
`trainable_variables`, `variables` and `losses` (the regularization terms), so the step
code does not care which API made it.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from fastcore.layers import Dense, Dropout, dropout, matmul
from fastcore.tasks.specs import MODEL_APIS, MLPSpec, Regularization  # noqa: F401 (re-exported)

def _keras_layers(spec: MLPSpec, reg: Regularization, policy: str, seed: int) -> list[keras.layers.Layer]:
    def dense(units, activation, i):
        if spec.initial_kernel is not None:
            kernel_init = keras.initializers.Constant(spec.initial_kernel)
        else:
            kernel_init = keras.initializers.GlorotUniform(seed=seed + i)
        return Dense(
            units, activation=activation, kernel_initializer=kernel_init, bias_initializer="zeros",
            kernel_regularizer=keras.regularizers.L2(reg.l2) if reg.l2 else None, dtype=policy)

    layers = []
    for i, units in enumerate(spec.hidden):
        layers.append(dense(units, spec.activation, i))
        if reg.dropout:
            layers.append(Dropout(reg.dropout, seed=seed + 1000 + i, dtype=policy))
    layers.append(dense(spec.outputs, None, len(spec.hidden)))
    return layers


def _sequential(spec, reg, policy, seed):
    return keras.Sequential([keras.Input((spec.inputs,)), *_keras_layers(spec, reg, policy, seed)], name="mlp")


def _functional(spec, reg, policy, seed):
    inputs = keras.Input((spec.inputs,))
    h = inputs
    for layer in _keras_layers(spec, reg, policy, seed):
        h = layer(h)
    return keras.Model(inputs, h, name="mlp")


class KerasSubclassMLP(keras.Model):
    """The subclassing API: layers as attributes, `call` written by hand."""

    def __init__(self, spec: MLPSpec, reg: Regularization, policy: str, seed: int):
        super().__init__(name="mlp")
        self.stack = _keras_layers(spec, reg, policy, seed)

    def call(self, x, training=False):
        for layer in self.stack:
            x = layer(x, training=training) if isinstance(layer, Dropout) else layer(x)
        return x


def _subclass(spec, reg, policy, seed):
    model = KerasSubclassMLP(spec, reg, policy, seed)
    model(tf.zeros([1, spec.inputs]))   # creates the weights (a subclassed model has no input shape until called)
    return model


class ModuleMLP(tf.Module):
    """Keras-free MLP: explicit tf.Variable weights, hand-written activations, L2 and dropout."""

    def __init__(self, spec: MLPSpec, reg: Regularization, compute_dtype: tf.DType, seed: int):
        super().__init__(name="mlp")
        self.spec, self.reg, self.compute_dtype = spec, reg, compute_dtype
        sizes = (spec.inputs, *spec.hidden, spec.outputs)
        self.kernels, self.biases = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if spec.initial_kernel is not None:
                w = tf.fill([fan_in, fan_out], tf.constant(spec.initial_kernel, tf.float32))
            else:   # Glorot uniform, as Keras Dense does by default
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                w = tf.random.stateless_uniform([fan_in, fan_out], seed=[seed, i], minval=-limit, maxval=limit)
            self.kernels.append(tf.Variable(w, name=f"kernel_{i}"))
            self.biases.append(tf.Variable(tf.zeros([fan_out]), name=f"bias_{i}"))
        self.dropout_seed = tf.constant(seed + 1000, tf.int64)
        self.dropout_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="dropout_counter")

    def _activation(self, x):
        if self.spec.activation == "relu":   # where, not maximum: maximum's gradient at a tie is path-dependent
            return tf.where(x > 0, x, tf.zeros_like(x))
        # elu; exp of the clipped input keeps the untaken branch finite (no NaN gradients)
        return tf.where(x > 0, x, tf.exp(tf.minimum(x, tf.zeros_like(x))) - 1)

    def __call__(self, x, training=False):
        h = tf.cast(x, self.compute_dtype)
        last = len(self.kernels) - 1
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            h = matmul(h, w) + tf.cast(b, self.compute_dtype)
            if i < last:
                h = self._activation(h)
                if training and self.reg.dropout:
                    self.dropout_counter.assign_add(1)
                    h = dropout(h, self.reg.dropout, tf.stack([self.dropout_seed, self.dropout_counter]))
        return h

    @property
    def trainable_variables(self) -> tuple[tf.Variable, ...]:
        """Layer order (kernel, bias, kernel, ...) like Keras, not tf.Module's order by attribute name."""
        return tuple(v for pair in zip(self.kernels, self.biases) for v in pair)

    @property
    def losses(self) -> list[tf.Tensor]:
        """L2 terms, `l2 * sum(w**2)` per kernel: the same definition as keras.regularizers.L2."""
        if not self.reg.l2:
            return []
        return [self.reg.l2 * tf.reduce_sum(tf.square(w)) for w in self.kernels]


def build(spec: MLPSpec, api: str, reg: Regularization, policy: str, compute_dtype: tf.DType, seed: int):
    """Build the model `spec` with `api`; `policy` is the Keras dtype policy, `compute_dtype` its compute type."""
    if api == "module":
        return ModuleMLP(spec, reg, compute_dtype, seed)
    builders = {"keras-sequential": _sequential, "keras-functional": _functional, "keras-subclass": _subclass}
    if api not in builders:
        raise ValueError(f"unknown model API {api!r}: choose one of {', '.join(MODEL_APIS)}")
    return builders[api](spec, reg, policy, seed)
