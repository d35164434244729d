"""Compiled evaluate and predict (fastcore.engine.inference) against Keras' own, every example exactly once,
one compile per input shape."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.engine import inference

N = 203   # not a multiple of the batch sizes below: the last batch is padded, its padding cut off


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    return x, (x.sum(axis=1, keepdims=True) > 0).astype("float32"), rng.uniform(0.2, 2.0, size=N).astype("float32")


def engine_for(net, loss, metrics=None, mode="xla"):
    """The engine a Trainer builds for `net`, untrained (build, no fit)."""
    x, y, _ = data()
    trainer = fastcore.Trainer(net, keras.optimizers.Adam(), loss=loss, metrics=metrics, mode=mode)
    return trainer.build(trainer.feed(x, y, batch_size=32))


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])


@pytest.fixture(scope="module")
def pair():
    """A fastcore engine and the same model compiled by Keras with the same loss and metrics."""
    net = mlp()
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    engine = engine_for(net, loss, ["accuracy"])
    net.compile(loss=loss, metrics=["accuracy"])
    return engine, net


def test_evaluate_equals_keras_evaluate_and_compiles_once(pair):
    engine, net = pair
    x, y, _ = data()
    ours = inference.evaluate(engine, x, y, batch_size=64)
    keras_values = net.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    assert set(ours) == {"loss", "accuracy"} == set(keras_values)
    for name in ours:
        assert ours[name] == pytest.approx(keras_values[name], rel=1e-5), name
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)   # 64, 64, 64, 11: the last one padded
    assert inference.evaluate(engine, batches) == pytest.approx(ours, rel=1e-6)
    assert engine.ledger.shapes()["eval"] == 1


def test_evaluate_with_sample_weights_equals_keras(pair):
    engine, net = pair
    x, y, w = data()
    ours = inference.evaluate(engine, x, y, batch_size=64, sample_weight=w)
    keras_values = net.evaluate(x, y, batch_size=64, sample_weight=w, return_dict=True, verbose=0)
    assert ours["loss"] == pytest.approx(keras_values["loss"], rel=1e-5)
    assert ours["loss"] != pytest.approx(inference.evaluate(engine, x, y, batch_size=64)["loss"], rel=1e-3)


def test_evaluate_without_a_dict_returns_what_keras_returns():
    net = mlp()
    engine = engine_for(net, "mse")
    x, y, _ = data()
    value = inference.evaluate(engine, x, y, return_dict=False)
    net.compile(loss="mse")
    assert value == pytest.approx(net.evaluate(x, y, verbose=0), rel=1e-5)


def test_predict_equals_keras_predict_in_order_with_one_compile(pair):
    engine, net = pair
    x, y, _ = data()
    ours = inference.predict(engine, x, batch_size=64)
    assert ours.shape == (N, 1)
    np.testing.assert_allclose(ours, net.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    again = inference.predict(engine, x[::-1].copy(), batch_size=64)   # in order: row i is example i
    np.testing.assert_allclose(again, ours[::-1], rtol=1e-5, atol=1e-6)
    from_dataset = inference.predict(engine, tf.data.Dataset.from_tensor_slices((x, y)).batch(64))   # labels ignored
    np.testing.assert_allclose(from_dataset, ours, rtol=1e-6, atol=1e-7)
    assert engine.ledger.counts()["predict"] == 1   # three calls, 12 batches, one shape: one trace
    inference.predict(engine, x[:5])   # another batch size: one more shape, not one per batch
    assert engine.ledger.shapes()["predict"] == 2


def test_predict_returns_a_dict_or_a_list_as_the_model_does():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    heads = {"score": keras.layers.Dense(1, name="score")(hidden), "kind": keras.layers.Dense(3, name="kind")(hidden)}
    x, _, _ = data()
    y = {"score": np.zeros((N, 1), "float32"), "kind": np.zeros((N, 3), "float32")}
    for outputs in (heads, [heads["score"], heads["kind"]]):
        net = keras.Model(inputs, outputs)
        trainer = fastcore.Trainer(net, keras.optimizers.Adam(), loss={"score": "mse", "kind": "mse"})
        engine = trainer.build(trainer.feed(x, y, batch_size=32))
        ours, theirs = inference.predict(engine, x, batch_size=50), net.predict(x, verbose=0)
        assert type(ours) is type(theirs)
        for a, b in zip(tf.nest.flatten(ours), tf.nest.flatten(theirs)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eager_mode_predicts_the_same_without_compiling(pair):
    _, net = pair
    engine = engine_for(net, "mse", mode="eager")
    x, _, _ = data()
    np.testing.assert_allclose(inference.predict(engine, x, batch_size=64), net.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert "predict" not in engine.ledger.counts()


def test_bad_calls_are_one_line():
    x, y, _ = data()

    def step(batch, ctx):
        raise AssertionError("never traced")
    trainer = fastcore.Trainer(mlp(), keras.optimizers.Adam(), step=step)
    engine = trainer.build(trainer.feed(x, y, batch_size=32))
    with pytest.raises(fastcore.UsageError, match="evaluate needs an evaluation"):
        inference.evaluate(engine, x, y)
    with pytest.raises(fastcore.UsageError, match="no model named 'other'"):
        inference.predict(engine, x, model="other")
    with pytest.raises(fastcore.UsageError, match="sample_weight must be None when x is a tf.data.Dataset"):
        inference.evaluate(engine, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), sample_weight=y[:, 0])
