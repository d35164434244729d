"""fastcore's fit against Keras' own `fit`: same initial weights, same batches, fresh optimizers of one config.

Keras `fit` is the reference for what a training step computes: the loss reduction, sample weights,
regularization losses, BatchNormalization's moving statistics. Each test trains one copy of a model with
fastcore and one with `model.fit` on one unshuffled dataset of batches and compares every variable, the
non-trainable ones (moving statistics) included, as max |ours - keras| / max |keras| per variable.

TOLERANCE = 2e-5. Measured here (12 steps): fastcore against Keras compiled the same way at most 3.9e-7
(graph: bit-identical; XLA K=4: the K steps are one XLA program, which rounds a little differently), and
Keras' own XLA and graph paths 1.1e-6 apart on the BN convnet: two correct float32 runs. The departures
this guards against are well above it (measured on these models): one extra update of the moving
statistics 8.2e-2, the sample weights ignored 5.5e-2, the L2 term dropped 4.8e-4.

The optimizer is plain SGD on purpose. Adam divides each gradient by its own running RMS: it turns the
rounding residue of a near-zero gradient into a full-size step (Keras' XLA and graph paths ended 0.2
apart after 12 steps at lr 1e-2 on a two-layer BN convnet), and it cannot see a gradient's scale (a loss
reduction off by a constant factor). For the same reason the convolution before BatchNormalization has no
bias (Keras' advice): BatchNormalization subtracts the batch mean, so such a bias has no gradient in
exact arithmetic and whatever moves it is rounding.
"""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
import pipelines
from fastcore.layers import Dropout

TOLERANCE = 2e-5
BATCH, STEPS = 32, 12


def sgd(learning_rate: float = 0.02):
    return keras.optimizers.SGD(learning_rate)


def bn_convnet():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((14, 14, 1)),
        keras.layers.Conv2D(8, 3, use_bias=False), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), Dropout(0.25), keras.layers.Dense(10)])


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((28,)),
                             keras.layers.Dense(32, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3)),
                             keras.layers.Dense(1)])


def text_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,), dtype="int32"), keras.layers.Embedding(200, 16),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])


def fashion_batches(data_dir) -> tf.data.Dataset:
    """Fashion-MNIST images at 14x14 (2x2 means): the convolution compiles faster under XLA."""
    data = pipelines.registry.load("fashion_mnist", f"train[:{BATCH * STEPS}]", data_dir)
    images = data.x.reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4))
    return tf.data.Dataset.from_tensor_slices((images, data.y)).batch(BATCH, drop_remainder=True)


def higgs_batches(data_dir) -> tf.data.Dataset:
    """(x, y, sample_weight): the weights check that both divide the weighted sum by the batch size."""
    data = pipelines.registry.load("higgs", f"train[:{BATCH * STEPS}]", data_dir)
    weights = np.random.default_rng(0).uniform(0.5, 1.5, len(data.x)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((data.x, data.y.reshape(-1, 1).astype("float32"), weights)).batch(
        BATCH, drop_remainder=True)


def token_batches() -> tf.data.Dataset:
    """Integer token sequences; the label says whether more than 4 tokens are below 40."""
    tokens = np.random.default_rng(0).integers(1, 200, size=(BATCH * STEPS, 20)).astype("int32")
    labels = (np.sum(tokens < 40, axis=1) > 4).astype("float32").reshape(-1, 1)
    return tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(BATCH, drop_remainder=True)


def differences(ours, theirs) -> dict[str, float]:
    """Per variable (by position: the two copies have one architecture), max |a - b| / max |b|."""
    out = {}
    for va, vb in zip(ours.variables, theirs.variables):
        a, b = np.asarray(va.numpy(), np.float64), np.asarray(vb.numpy(), np.float64)
        out[va.path] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    return out


def fit_both(make, batches, loss, mode: str, k: int, learning_rate: float = 0.02):
    """The model trained by fastcore and by Keras' fit (compiled the same way), from the same weights."""
    ours, theirs, start = make(), make(), make()
    theirs.set_weights(ours.get_weights())
    start.set_weights(ours.get_weights())
    fastcore.Trainer(ours, sgd(learning_rate), loss=loss, mode=mode, steps_per_call=k).fit(batches, epochs=1,
                                                                                          verbose=False)
    theirs.compile(sgd(learning_rate), loss=loss, jit_compile=mode == "xla")
    theirs.fit(batches, epochs=1, verbose=0, shuffle=False)
    return ours, theirs, start


def assert_same_training(ours, theirs, start) -> None:
    diffs = differences(ours, theirs)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"fastcore and Keras fit differ: {worst} by {diffs[worst]:.2e} relative"
    moved = differences(theirs, start)   # training moved every float variable far beyond the tolerance
    still = [name for name, d in moved.items() if d <= 100 * TOLERANCE and "seed" not in name]
    assert not still, f"training did not move {still}: the comparison would prove nothing"


@pytest.mark.parametrize("mode,k", [("xla", 4), ("graph", 1)])
def test_bn_convnet_matches_keras_fit(data_dir, mode, k):
    ours, theirs, start = fit_both(bn_convnet, fashion_batches(data_dir),
                                   keras.losses.SparseCategoricalCrossentropy(from_logits=True), mode, k)
    assert any("moving_mean" in v.path for v in ours.variables)
    assert_same_training(ours, theirs, start)


def test_mlp_with_l2_and_sample_weights_matches_keras_fit(data_dir):
    assert_same_training(*fit_both(mlp, higgs_batches(data_dir), keras.losses.BinaryCrossentropy(from_logits=True),
                                   "xla", 4))


def test_text_model_matches_keras_fit():
    """Integer tokens through an Embedding: its gradient is sparse (IndexedSlices) on both paths."""
    assert_same_training(*fit_both(text_model, token_batches(), keras.losses.BinaryCrossentropy(from_logits=True),
                                   "xla", 4, learning_rate=0.5))


@pytest.fixture(scope="module")
def trained_twice(data_dir):
    """A BN convnet's Trainer after two fits (the second one's pre-flight report kept)."""
    batches = fashion_batches(data_dir)
    trainer = fastcore.Trainer(bn_convnet(), sgd(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                               steps_per_call=4)
    trainer.fit(batches, epochs=1, verbose=False)
    trainer.fit(batches, epochs=1, verbose=False)
    return trainer, batches


def test_second_fit_of_a_bn_model_passes_the_preflight(trained_twice):
    """The second fit's warm-up reuses the compiled training call, so it runs while the pre-flight still
    compiles: a warm-up that left the moving statistics moved failed this pre-flight."""
    trainer, _ = trained_twice
    report = trainer.preflight_report
    assert report.passed and report.worst[2] <= 1e-5, report.line()


def test_verify_after_training_passes_on_a_bn_model(trained_twice):
    trainer, batches = trained_twice
    before = [v.numpy().copy() for v in trainer.engine.model_variables]
    report = trainer.verify(batches, steps=8)
    assert report.passed, report.verdict
    assert any("moving_variance" in d.name for d in report.compiled_vs_eager)   # the statistics are compared
    for v, value in zip(trainer.engine.model_variables, before):
        np.testing.assert_array_equal(v.numpy(), value)   # verify changes nothing
