"""A step whose update is not applied changes no model variable, BatchNormalization's moving statistics and
RNG states included: a non-finite step (the guard), a float16 overflow (the loss scaler's skip), a call with
updates off (the pre-flight's warm-up). The forward pass moves those statistics before the step knows it
will not be applied, so the engine puts them back."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.engine.step import Engine
from fastcore.layers import Dropout

BATCH = 16


def bn_mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                             keras.layers.ReLU(), Dropout(0.2), keras.layers.Dense(1)])


def mse_step(model):
    def step(batch, ctx):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(ctx.call(model, x), tf.float32) - y))
            scaled = ctx.scale(loss)
        variables = model.trainable_variables
        return fastcore.Update(loss, zip(tape.gradient(scaled, variables), variables))
    return step


def engine_for(model, optimizer, loss_scaling: bool = False, mode: str = "xla") -> Engine:
    return Engine({"model": model}, {"optimizer": optimizer}, mse_step(model), global_batch_size=BATCH,
                  loss_scaling=loss_scaling, mode=mode)


def batch(seed: int, nan: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(BATCH, 8)).astype("float32")   # far from the initial moving mean 0
    if nan:
        x[0, 0] = np.nan
    return tf.constant(x), tf.constant(rng.normal(size=(BATCH, 1)).astype("float32"))


def values(engine) -> list[np.ndarray]:
    return [v.numpy().copy() for v in engine.model_variables]


def assert_same(engine, expected: list[np.ndarray]) -> None:
    for v, value in zip(engine.model_variables, expected):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)


def moving_mean(engine) -> np.ndarray:
    return next(v for v in engine.model_variables if "moving_mean" in v.path).numpy().copy()


def moving_mean_of(saved: list[np.ndarray], engine) -> np.ndarray:
    return next(value for v, value in zip(engine.model_variables, saved) if "moving_mean" in v.path)


@pytest.mark.parametrize("mode", ["xla", "graph", "eager"])
def test_a_non_finite_step_changes_no_model_variable(mode):
    engine = engine_for(bn_mlp(), keras.optimizers.SGD(0.1), mode=mode)
    start = moving_mean(engine)
    engine.train_one(batch(0))
    assert not np.array_equal(moving_mean(engine), start)   # an applied step moves the statistics
    after_good = values(engine)
    engine.train_one(batch(1, nan=True))
    assert int(engine.first_non_finite_step.numpy()) == 2
    assert_same(engine, after_good)


def test_k_steps_keep_the_applied_step_and_put_back_the_skipped_one():
    """[good, non-finite] in one K=2 call ends where the good step alone ends (the K-step loop's path)."""
    good, bad = batch(0), batch(1, nan=True)
    alone = engine_for(bn_mlp(), keras.optimizers.SGD(0.1))
    alone.train_one(good)
    walked = engine_for(bn_mlp(), keras.optimizers.SGD(0.1))
    walked.train_many(tf.nest.map_structure(lambda a, b: tf.stack([a, b]), good, bad))
    assert int(walked.first_non_finite_step.numpy()) == 2
    assert_same(walked, values(alone))


def test_a_call_with_updates_off_changes_no_model_variable():
    engine = engine_for(bn_mlp(), keras.optimizers.SGD(0.1))
    start = values(engine)
    engine.updates_on.assign(False)
    engine.train_one(batch(0))
    assert_same(engine, start)
    assert int(engine.steps.numpy()) == 0
    engine.updates_on.assign(True)
    engine.train_one(batch(0))
    assert not np.array_equal(moving_mean(engine), moving_mean_of(start, engine))


def test_a_float16_overflow_skip_changes_no_model_variable():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = bn_mlp()
    finally:
        keras.config.set_dtype_policy(previous)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    engine = engine_for(model, optimizer, loss_scaling=True)
    start = values(engine)
    optimizer.dynamic_scale.assign(2.0 ** 60)   # the scaled loss overflows float16's 65504
    engine.train_one(batch(0))
    assert engine.skipped_steps == 1
    assert_same(engine, start)
    optimizer.dynamic_scale.assign(1.0)
    engine.train_one(batch(0))
    assert engine.skipped_steps == 1 and not np.array_equal(moving_mean(engine), moving_mean_of(start, engine))
