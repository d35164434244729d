"""Steps on batches the caller makes (train_on_batch, save/restore), step phases, and a step that calls
apply_gradients itself (refused)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.errors import CheckpointMismatch, NonFiniteError, UsageError


def mlp():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])


def batch(seed, n=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, x.sum(axis=1, keepdims=True)


def test_train_on_batch_is_one_compiled_guarded_step_per_call_without_retrace():
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.05), loss="mse")
    losses = [trainer.train_on_batch(batch(i))["loss"] for i in range(30)]
    engine = trainer.engine
    assert int(engine.steps.numpy()) == 30
    assert engine.ledger.counts()["train"] == 1   # one trace for every same-shaped batch
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_train_on_batch_matches_the_eager_twin_on_fresh_batches():
    compiled = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-2), loss="mse")
    eager = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-2), loss="mse", mode="eager")
    for i in range(5):
        a, b = compiled.train_on_batch(batch(i)), eager.train_on_batch(batch(i))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for v, w in zip(compiled.models["model"].variables, eager.models["model"].variables):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-4, atol=1e-6)


def test_a_non_finite_batch_is_refused_and_changes_no_weight():
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.05), loss="mse")
    trainer.train_on_batch(batch(0))
    before = [v.numpy().copy() for v in trainer.models["model"].variables]
    x, y = batch(1)
    x[3, 0] = np.nan
    with pytest.raises(NonFiniteError):
        trainer.train_on_batch((x, y))
    for v, w in zip(trainer.models["model"].variables, before):
        np.testing.assert_array_equal(v.numpy(), w)


def test_save_and_restore_continue_exactly(tmp_path):
    first = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-2), loss="mse")
    for i in range(4):
        first.train_on_batch(batch(i))
    first.save(str(tmp_path / "ckpt"))
    for i in range(4, 6):
        first.train_on_batch(batch(i))
    second = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-2), loss="mse")   # a new process's loop would
    assert second.restore(str(tmp_path / "ckpt")) == 4   # loaded when the first step builds, before it runs
    for i in range(4, 6):
        second.train_on_batch(batch(i))
    assert int(second.engine.steps.numpy()) == 6
    for v, w in zip(first.models["model"].variables, second.models["model"].variables):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-6)
    other = fastcore.Trainer(mlp, keras.optimizers.SGD(0.1), loss="mse")
    other.train_on_batch(batch(0))
    with pytest.raises(CheckpointMismatch):
        other.restore(str(tmp_path / "ckpt"))


def critic_and_generator():
    gen = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    disc = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    return {"gen": gen, "disc": disc}


def critic_step(real, ctx):
    gen, disc = ctx.models["gen"], ctx.models["disc"]
    z = fastcore.random.normal([16, 2], ctx.seed())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(disc(gen(z))) - tf.reduce_mean(disc(real))
    grads = tape.gradient(loss, disc.trainable_variables)
    return fastcore.Update(loss={"d_loss": loss}, gradients={"disc": zip(grads, disc.trainable_variables)})


def generator_step(real, ctx):
    gen, disc = ctx.models["gen"], ctx.models["disc"]
    z = fastcore.random.normal([16, 2], ctx.seed())
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(disc(gen(z)))
    grads = tape.gradient(loss, gen.trainable_variables)
    return fastcore.Update(loss={"g_loss": loss}, gradients={"gen": zip(grads, gen.trainable_variables)})


def test_step_phases_update_the_critic_n_times_per_generator_update_and_verify():
    optimizers = {"gen": keras.optimizers.SGD(0.01), "disc": keras.optimizers.SGD(0.01)}
    trainer = fastcore.Trainer(critic_and_generator, optimizers, step=[(critic_step, 3), generator_step])
    real = np.random.default_rng(0).normal(2.0, 0.5, size=(16 * 8, 2)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices(real).batch(16, drop_remainder=True)
    result = trainer.fit(data, epochs=2, verbose=False)
    assert {"train_d_loss", "train_g_loss"} <= set(result.history[-1])
    assert int(optimizers["disc"].iterations.numpy()) == 3 * int(optimizers["gen"].iterations.numpy()) == 3 * 16
    assert trainer.verify(data, steps=4).passed


def test_a_step_that_calls_apply_gradients_is_refused_in_one_line():
    optimizer = keras.optimizers.SGD(0.01)

    def step(batch, ctx):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ctx.model(x) - y))
        grads = tape.gradient(loss, ctx.model.trainable_variables)
        optimizer.apply_gradients(zip(grads, ctx.model.trainable_variables))
        return fastcore.Update(loss, zip(grads, ctx.model.trainable_variables))

    trainer = fastcore.Trainer(mlp, optimizer, step=step)
    with pytest.raises(UsageError, match=r"called optimizer\.apply_gradients\(\)") as caught:
        trainer.train_on_batch(batch(0))
    assert "\n" not in str(caught.value)


def test_a_resumed_fit_given_other_data_is_refused_in_one_line(tmp_path):
    def episode(seed):
        return tf.data.Dataset.from_tensor_slices(batch(seed, 64)).batch(16, drop_remainder=True)
    fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss="mse").fit(
        episode(0), epochs=1, run_dir=str(tmp_path), verbose=False)
    again = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss="mse")
    with pytest.raises(CheckpointMismatch, match="data") as caught:
        again.fit(episode(1), epochs=2, run_dir=str(tmp_path), resume=True, verbose=False)
    assert "\n" not in str(caught.value)
    same = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss="mse")
    result = same.fit(episode(0), epochs=2, run_dir=str(tmp_path), resume=True, verbose=False)
    assert result.summary["resumed_from_step"] == 4
