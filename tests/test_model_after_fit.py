"""The trained model is the user's model: after `fit` it predicts, saves (.keras, SavedModel, export) and
reloads to the same predictions, whether it was passed built or as a factory returning it."""
from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
import fastcore.layers
from fastcore.engine import inference


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    return x, (x.sum(axis=1, keepdims=True) > 0).astype("float32")


def model():
    """Layers with state beside the weights: BN statistics, Keras' and fastcore's dropout seed generators."""
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dropout(0.2),
                             fastcore.layers.Dropout(0.2, seed=3), fastcore.layers.Dense(1)])


def trained(spec_kind: str):
    """The model after fit, and fastcore's compiled predictions with it, the Trainer dropped as a one-liner drops it."""
    x, y = data()
    net = model()
    before = [v.numpy().copy() for v in net.trainable_variables]
    trainer = fastcore.Trainer(net if spec_kind == "built" else (lambda: net), keras.optimizers.Adam(),
                               loss=keras.losses.BinaryCrossentropy(from_logits=True))
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=False)
    assert trainer.models["model"] is net
    assert any(np.abs(a - v.numpy()).max() > 0 for a, v in zip(before, net.trainable_variables))   # fit trained it
    compiled = inference.predict(trainer.engine, x)
    del trainer
    gc.collect()
    return net, x, compiled


@pytest.fixture(scope="module", params=["built", "factory"])
def after_fit(request):
    return trained(request.param)


def test_predict_matches_the_compiled_forward(after_fit):
    net, x, compiled = after_fit
    np.testing.assert_allclose(net.predict(x, verbose=0), compiled, rtol=1e-5, atol=1e-6)


def test_keras_file_reloads_to_the_same_predictions(after_fit, tmp_path):
    net, x, _ = after_fit
    net.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-6, atol=1e-7)


def test_export_reloads_to_the_same_predictions(after_fit, tmp_path):
    net, x, _ = after_fit
    net.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x).numpy(), net.predict(x, verbose=0), rtol=1e-6, atol=1e-7)


def test_saved_model_reloads_to_the_same_predictions(after_fit, tmp_path):
    net, x, _ = after_fit
    tf.saved_model.save(net, str(tmp_path / "saved"))
    serving = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    (out,) = serving(tf.constant(x)).values()
    np.testing.assert_allclose(out.numpy(), net.predict(x, verbose=0), rtol=1e-6, atol=1e-7)


def test_auto_does_not_time_a_factory_that_returns_the_users_model(monkeypatch):
    """`lambda: model` under precision="auto": timing bfloat16 would train the user's own model with throwaway
    optimizers (measured: weights moved by 0.046) and time float32 twice; auto keeps float32 and says why."""
    from fastcore.engine import autoprecision, precision
    monkeypatch.setattr(autoprecision, "resolve", lambda name, xla, graph_bf16: precision.Precision("bfloat16", "auto: peaks"))
    x, y = data()
    net = model()
    before = [v.numpy().copy() for v in net.variables]
    trainer = fastcore.Trainer(lambda: net, keras.optimizers.Adam(), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                               precision="auto")
    trainer.build(trainer.feed(x, y, batch_size=32))
    assert trainer.precision.name == "float32" and "same model each time" in trainer.precision.reason
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, net.variables))
