"""The four model APIs build the same network; the dropout mask is the same compiled and eager."""
import numpy as np
import pytest
import tensorflow as tf

from fastcore import random
from fastcore.tasks import models

SPEC = models.MLPSpec(28, (16, 8), "elu", 1)


def build(api, reg=models.Regularization()):
    return models.build(SPEC, api, reg, "float32", tf.float32, seed=0)


@pytest.mark.parametrize("api", models.MODEL_APIS)
def test_every_api_computes_the_same_function_from_the_same_weights(api):
    reference, model = build("keras-functional"), build(api)
    assert [tuple(v.shape) for v in model.trainable_variables] == \
           [tuple(v.shape) for v in reference.trainable_variables]
    for src, dst in zip(reference.trainable_variables, model.trainable_variables):
        dst.assign(src + np.random.default_rng(0).normal(0, 0.01, src.shape).astype(np.float32))  # not the initial values
        src.assign(dst)
    x = tf.random.stateless_normal([32, 28], seed=[1, 2])
    np.testing.assert_allclose(model(x, training=False), reference(x, training=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["keras-sequential", "module"])
def test_l2_appears_in_model_losses(api):
    assert build(api).losses == [] or all(float(l) == 0 for l in build(api).losses)
    model = build(api, models.Regularization(l2=1e-3))
    expected = sum(1e-3 * float(tf.reduce_sum(tf.square(v))) for v in model.trainable_variables if len(v.shape) == 2)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("api", ["keras-functional", "keras-subclass", "module"])
def test_dropout_acts_only_in_training(api):
    model = build(api, models.Regularization(dropout=0.5))
    x = tf.ones([64, 28])
    assert np.array_equal(model(x, training=False), model(x, training=False))
    assert not np.array_equal(model(x, training=True), model(x, training=False))


def test_dropout_mask_is_identical_under_xla_and_eager():
    seed = tf.Variable([7, 3], dtype=tf.int64)   # a variable seed: the case where Philox differs under XLA
    draw = lambda: random.uniform(tf.constant([64, 512], tf.int64), seed)
    eager, compiled = draw().numpy(), tf.function(draw, jit_compile=True)().numpy()
    assert np.array_equal(eager, compiled)
    assert 0.49 < eager.mean() < 0.51 and eager.min() >= 0 and eager.max() < 1
    seed.assign([7, 4])
    assert abs(np.corrcoef(eager.ravel(), draw().numpy().ravel())[0, 1]) < 0.02
