"""Model builders: one MLP description, four ways to build it (three Keras APIs and a Keras-free tf.Module).

Every builder gives an object that is callable as `model(x, training=...)`, exposes
`trainable_variables`, `variables` and `losses` (the regularization terms), so the step
code does not care which API made it.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from fastcore.specs import MODEL_APIS, MLPSpec, Regularization  # noqa: F401 (re-exported)

_MASK32 = 0xFFFFFFFF


def _mix32(h: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) in int64 arithmetic that never overflows:
    values stay below 2**32 and multipliers below 2**31."""
    xor, shift, mask = tf.bitwise.bitwise_xor, tf.bitwise.right_shift, tf.bitwise.bitwise_and
    h = mask(xor(h, shift(h, 16)) * 0x7FEB352D, _MASK32)
    h = mask(xor(h, shift(h, 15)) * 0x5BD1E995, _MASK32)
    return xor(h, shift(h, 16))


def hashed_uniform(shape, seed: tf.Tensor) -> tf.Tensor:
    """Uniform [0, 1) floats from a counter hash of (seed[0], seed[1], element index).

    TensorFlow's stateless Philox kernel and XLA's differ whenever the seed is not a constant
    (measured: max difference 0.9 for the same seed), so a compiled step and its eager twin would
    drop different units. Integer hashing is exact on both paths: the masks are identical.
    """
    xor, mask = tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    seed = mask(tf.cast(seed, tf.int64), _MASK32)
    key = _mix32(xor(seed[0], _mix32(seed[1])))
    index = tf.reshape(tf.range(tf.reduce_prod(shape), dtype=tf.int64), shape)
    bits = _mix32(xor(_mix32(mask(index + key, _MASK32)), key))
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """Inverted dropout with a mask that is the same compiled and eager (see hashed_uniform)."""
    keep = hashed_uniform(tf.shape(x, out_type=tf.int64), seed) >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


class HashedDropout(keras.layers.Layer):
    """Keras dropout layer on `dropout` above; Keras' own Dropout draws differently under XLA."""

    def __init__(self, rate: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        return dropout(x, self.rate, self.seed_generator.next())


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
    """x @ w in x's dtype; bfloat16 under XLA goes through _bf16_dot (float32 accumulation)."""
    if x.dtype == tf.bfloat16 and _in_xla():
        return tf.cast(_bf16_dot(x, tf.cast(w, tf.bfloat16)), tf.bfloat16)
    return tf.matmul(x, tf.cast(w, x.dtype))


class Dense(keras.layers.Dense):
    """keras.layers.Dense whose matmul is `matmul` above (same weights, same variables)."""

    def call(self, inputs, training=None):
        if self.compute_dtype != "bfloat16":
            return super().call(inputs, training=training)
        x = matmul(tf.cast(inputs, tf.bfloat16), self.kernel)
        if self.bias is not None:
            x += tf.cast(self.bias, tf.bfloat16)
        return self.activation(x) if self.activation is not None else x


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
            layers.append(HashedDropout(reg.dropout, seed=seed + 1000 + i, dtype=policy))
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
            x = layer(x, training=training) if isinstance(layer, HashedDropout) else layer(x)
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
