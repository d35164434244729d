"""Random numbers that agree on every path: XLA, plain graphs and eager, inside fastcore's step or not.

TensorFlow's stateless random kernels and XLA's turn the same seed into different numbers (measured: normal
draws 5.3 apart). Inside fastcore's step the eager twin draws with XLA's kernels (fastcore.engine.twin_random),
so Keras' and TensorFlow's random ops are fine there; these functions need no such help: they hash (seed,
element index) with integer ops only, which every path computes exactly. `uniform` is bit-identical
everywhere; `normal`'s log and cos round differently under XLA (2.4e-7 apart, measured).

`seed` is an int64 tensor of shape [2]; inside a step function, `ctx.seed()` gives a fresh one per
call and per step that is the same compiled and eager, and resumes exactly from a checkpoint.
"""
from __future__ import annotations

import math

import tensorflow as tf

_MASK32 = 0xFFFFFFFF


def _mix32(h: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) in int64 arithmetic that never overflows:
    values stay below 2**32 and multipliers below 2**31."""
    xor, shift, mask = tf.bitwise.bitwise_xor, tf.bitwise.right_shift, tf.bitwise.bitwise_and
    h = mask(xor(h, shift(h, 16)) * 0x7FEB352D, _MASK32)
    h = mask(xor(h, shift(h, 15)) * 0x5BD1E995, _MASK32)
    return xor(h, shift(h, 16))


def _bits24(shape, seed, stream: int = 0) -> tf.Tensor:
    """24 random bits per element, as float32 in [0, 2**24)."""
    xor, mask = tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    seed = mask(tf.cast(seed, tf.int64), _MASK32)
    key = _mix32(xor(seed[0], _mix32(mask(seed[1] + stream * 0x9E3779B9, _MASK32))))
    index = tf.reshape(tf.range(tf.reduce_prod(shape), dtype=tf.int64), shape)
    bits = _mix32(xor(_mix32(mask(index + key, _MASK32)), key))
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32)


def uniform(shape, seed, minval: float = 0.0, maxval: float = 1.0, dtype=tf.float32) -> tf.Tensor:
    """Uniform floats in [minval, maxval) from `seed` (int64 [2]); the same compiled and eager."""
    unit = _bits24(tf.cast(shape, tf.int64), seed) * (1.0 / (1 << 24))
    return tf.cast(minval + (maxval - minval) * unit, dtype)


def normal(shape, seed, mean: float = 0.0, stddev: float = 1.0, dtype=tf.float32) -> tf.Tensor:
    """Normal floats (Box-Muller on two hashed uniforms) from `seed` (int64 [2]); the same compiled and eager."""
    shape = tf.cast(shape, tf.int64)
    u1 = (_bits24(shape, seed, 1) + 1.0) * (1.0 / (1 << 24))   # (0, 1]: log is finite
    u2 = _bits24(shape, seed, 2) * (1.0 / (1 << 24))
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
    return tf.cast(mean + stddev * z, dtype)
