"""The public API with a user's own models, optimizers, steps and data: each failure a new user hit works
now, or is refused with one line before the first step."""
import numpy as np
import pytest
import tensorflow as tf
import keras

import fastcore
from fastcore.options import FitOptions


def regression_data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32) + 0.1).astype(np.float32)
    return x, y


class PlainMLP(tf.Module):
    """No Keras: no `training` argument, no `.losses`."""

    def __init__(self):
        super().__init__()
        self.w1 = tf.Variable(tf.random.stateless_normal([4, 16], seed=[1, 2]) * 0.3)
        self.b1 = tf.Variable(tf.zeros([16]))
        self.w2 = tf.Variable(tf.random.stateless_normal([16, 1], seed=[3, 4]) * 0.3)

    def __call__(self, x):
        return tf.nn.tanh(x @ self.w1 + self.b1) @ self.w2


class PlainSGD(tf.Module):
    """Only `apply_gradients`: no build, no iterations, no Keras."""

    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def apply_gradients(self, pairs):
        for g, v in pairs:
            v.assign_sub(self.lr * g)


def my_loss(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def test_a_keras_free_module_with_a_hand_written_loss_and_optimizer_trains(tmp_path):
    x, y = regression_data()
    trainer = fastcore.Trainer(PlainMLP(), PlainSGD(0.05), loss=my_loss, metrics=[my_loss])
    first = trainer.fit(x, y, batch_size=32, epochs=1, validation_data=(x, y), verbose=False)
    result = trainer.fit(x, y, batch_size=32, epochs=8, validation_data=(x, y), run_dir=str(tmp_path / "run"),
                         verbose=False)
    assert result.history[-1]["eval_loss"] < 0.5 * first.history[-1]["eval_loss"]
    assert result.summary["preflight"]["passed"]
    assert result.summary["traces"] == {"train": 1, "eval": 1}
    assert (tmp_path / "run" / "summary.json").exists()


def gan(seed=0):
    keras.utils.set_random_seed(seed)
    gen = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    disc = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    return {"gen": gen, "disc": disc}


def gan_step(poison_at: int | None = None):
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(real, ctx):
        gen, disc = ctx.models["gen"], ctx.models["disc"]
        noise = fastcore.random.normal(tf.shape(real), ctx.seed())
        with tf.GradientTape(persistent=True) as tape:
            fake = ctx.call(gen, noise)
            real_logits, fake_logits = ctx.call(disc, real), ctx.call(disc, fake)
            d_loss = bce(tf.ones_like(real_logits), real_logits) + bce(tf.zeros_like(fake_logits), fake_logits)
            g_loss = bce(tf.ones_like(fake_logits), fake_logits)
            if poison_at is not None:   # a NaN in the generator's loss only, at one step
                g_loss += tf.where(ctx._engine.steps + 1 == poison_at, float("nan"), 0.0)
            d_scaled, g_scaled = ctx.scale(d_loss, "disc"), ctx.scale(g_loss, "gen")
        return fastcore.Update(
            loss={"d_loss": d_loss, "g_loss": g_loss},
            gradients={"disc": zip(tape.gradient(d_scaled, disc.trainable_variables), disc.trainable_variables),
                       "gen": zip(tape.gradient(g_scaled, gen.trainable_variables), gen.trainable_variables)})
    return step


def ring(n=1024):
    angle = np.random.default_rng(0).uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32) + 2.0


def gan_trainer(poison_at=None, precision="float32", models=None, k=4):
    return fastcore.Trainer(models or gan, {"gen": keras.optimizers.Adam(1e-2), "disc": keras.optimizers.Adam(1e-2)},
                            step=gan_step(poison_at), steps_per_call=k, precision=precision)


def points(n=1024):
    return tf.data.Dataset.from_tensor_slices(ring(n)).batch(64, drop_remainder=True)   # no .repeat()


def test_a_two_optimizer_step_logs_both_losses_and_resumes_both_optimizers(tmp_path):
    run = str(tmp_path / "gan")
    first = gan_trainer().fit(points(), epochs=2, run_dir=run, checkpoint_every=8, verbose=False)
    assert {"train_d_loss", "train_g_loss"} <= set(first.history[-1])
    assert first.summary["steps"] == 32
    resumed_trainer = gan_trainer()
    resumed = resumed_trainer.fit(points(), epochs=3, run_dir=run, resume=True, verbose=False)
    assert resumed.summary["resumed_from"].endswith("-32") and resumed.summary["steps"] == 48
    for name in ("gen", "disc"):
        assert int(resumed_trainer.engine.optimizers[name].iterations.numpy()) == 48


def test_a_nan_in_one_models_loss_changes_no_weight_of_either_model():
    trainer = gan_trainer(poison_at=6, k=1)
    trainer.fit(points(), steps=5, verbose=False)
    before = [v.numpy().copy() for m in trainer.models.values() for v in m.variables]
    with pytest.raises(fastcore.NonFiniteError, match="at step 6"):
        trainer.fit(points(), steps=3, verbose=False)
    after = [v.numpy() for m in trainer.models.values() for v in m.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a non-finite step changed a weight"
    assert all(int(o.iterations.numpy()) == 5 for o in trainer.engine.optimizers.values())


def test_float16_skips_a_nan_step_in_every_optimizer_together():
    trainer = fastcore.Trainer(gan, {"gen": keras.optimizers.Adam(1e-2), "disc": keras.optimizers.Adam(1e-2)},
                               step=gan_step(poison_at=3), steps_per_call=1, precision="float16")
    result = trainer.fit(points(), steps=6, verbose=False)
    assert result.summary["skipped_steps"] >= 1
    iterations = {n: int(o.iterations.numpy()) for n, o in trainer.engine.optimizers.items()}
    assert iterations["gen"] == iterations["disc"] == 6 - result.summary["skipped_steps"]


def test_float16_refuses_a_step_that_forgets_to_scale_its_loss():
    def unscaled(batch, ctx):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(my_loss(y, tf.cast(ctx.call(ctx.model, x), tf.float32)))
        return fastcore.Update(loss, zip(tape.gradient(loss, ctx.model.trainable_variables),
                                         ctx.model.trainable_variables))
    x, y = regression_data()
    make = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    trainer = fastcore.Trainer(make, keras.optimizers.SGD(0.01), step=unscaled, precision="float16")
    with pytest.raises(fastcore.UsageError, match="ctx.scale"):
        trainer.fit(x, y, batch_size=32, verbose=False)


def test_dict_elements_reach_the_step_intact_and_a_dataset_need_not_repeat():
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices({"features": x, "target": y}).batch(32, drop_remainder=True)
    seen = []

    def step(batch, ctx):
        seen.append(sorted(batch))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(my_loss(batch["target"], ctx.call(ctx.model, batch["features"])))
        return fastcore.Update(loss, zip(tape.gradient(loss, ctx.model.trainable_variables),
                                         ctx.model.trainable_variables))
    trainer = fastcore.Trainer(PlainMLP(), keras.optimizers.SGD(0.05), step=step)
    result = trainer.fit(ds, epochs=3, verbose=False)   # 3 passes over a dataset without .repeat()
    assert result.summary["steps"] == 48
    assert seen and all(keys == ["features", "target"] for keys in seen)


def test_a_dataset_that_cannot_be_checkpointed_is_said_at_the_start_and_weights_are_still_saved(tmp_path):
    x, y = regression_data(256)

    def rows():
        yield from zip(x, y)
    ds = tf.data.Dataset.from_generator(rows, output_signature=(tf.TensorSpec([4]), tf.TensorSpec([1])))
    ds = ds.batch(32, drop_remainder=True)
    import io
    out = io.StringIO()
    trainer = fastcore.Trainer(PlainMLP(), keras.optimizers.SGD(0.05), loss=my_loss)
    result = trainer.run(ds, options=FitOptions(epochs=2, steps_per_epoch=8, run_dir=str(tmp_path / "gen"), out=out))
    notes = [line for line in out.getvalue().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cannot be checkpointed" in notes[0]
    assert result.summary["checkpoint"] and tf.train.latest_checkpoint(str(tmp_path / "gen" / "checkpoints"))


def test_a_short_last_batch_is_dropped_in_training_and_counted_once_in_evaluation():
    x, y = regression_data(100)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)   # 32, 32, 32, 4
    trainer = fastcore.Trainer(PlainMLP(), keras.optimizers.SGD(0.01), loss=my_loss, metrics={"sq": my_loss})
    result = trainer.fit(train, epochs=1, steps_per_epoch=3, validation_data=train, verbose=False)
    assert result.summary["traces"] == {"train": 1, "eval": 1}
    expected = float(np.mean(my_loss(y, trainer.models["model"](x)).numpy()))
    assert result.history[-1]["eval_sq"] == pytest.approx(expected, rel=1e-5)


def test_an_infinite_dataset_without_steps_per_epoch_is_one_clear_line():
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True).repeat()
    trainer = fastcore.Trainer(PlainMLP(), keras.optimizers.SGD(0.01), loss=my_loss)
    with pytest.raises(fastcore.UsageError, match="infinite: pass steps_per_epoch"):
        trainer.fit(ds, epochs=1, verbose=False)


def dropout_model(layer):
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(32, activation="relu"), layer,
                                     keras.layers.Dense(1)])


def test_stock_keras_dropout_and_fastcore_dropout_pass_preflight_and_verify():
    x, y = regression_data()
    stock = fastcore.Trainer(dropout_model(keras.layers.Dropout(0.5)), keras.optimizers.SGD(0.01), loss=my_loss)
    stock.fit(x, y, batch_size=32, epochs=1, verbose=False)   # pre-flight runs in inference mode: no false alarm
    assert stock.preflight_report.passed
    hashed = fastcore.Trainer(dropout_model(fastcore.layers.Dropout(0.5, seed=1)), keras.optimizers.SGD(0.01),
                              loss=my_loss)
    assert hashed.verify(x, y, batch_size=32, steps=20).passed
    report = stock.verify(x, y, batch_size=32, steps=20)   # the eager twin draws XLA's masks (engine/twin_random)
    assert report.passed, report.verdict


class PerturbedWhenCompiled(keras.layers.Layer):
    """A stand-in for an XLA miscompile: different numbers only inside the compiled graph."""

    def call(self, x):
        return x if tf.executing_eagerly() else x * 1.5


def test_preflight_refuses_a_miscompiled_step_and_says_which_tensors_differ():
    x, y = regression_data()
    make = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), PerturbedWhenCompiled(),
                                     keras.layers.Dense(1)])
    trainer = fastcore.Trainer(make, keras.optimizers.SGD(0.01), loss=my_loss)
    before = None
    with pytest.raises(fastcore.PreflightError) as refused:
        trainer.fit(x, y, batch_size=32, epochs=1, verbose=False)
    line = str(refused.value)
    assert "\n" not in line and "disagrees with its eager twin" in line and "loss loss" in line
    assert not refused.value.report.passed
    assert int(trainer.engine.steps.numpy()) == 0, "training started despite the disagreement"
    del before
    skipped = fastcore.Trainer(make, keras.optimizers.SGD(0.01), loss=my_loss, preflight=False)
    assert skipped.fit(x, y, batch_size=32, epochs=1, verbose=False).summary["steps"] > 0


def test_utilisation_and_flops_for_a_model_that_is_not_an_mlp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 256).astype(np.int32)
    make = lambda: keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                     keras.layers.Dense(3)])
    trainer = fastcore.Trainer(make, keras.optimizers.SGD(0.01),
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_call=2)
    result = trainer.fit(x, y, batch_size=32, epochs=3, verbose=False)
    conv_forward = 2 * 6 * 6 * 9 * 4   # multiply-adds x 2 of the 3x3 conv, per example
    assert result.summary["flops_per_example"] > 3 * conv_forward
    assert 0 < result.summary["utilisation"] < 1.5


def test_several_optimizers_must_be_named_after_their_models():
    with pytest.raises(fastcore.UsageError, match="name each after the model"):
        fastcore.Trainer(gan, {"a": keras.optimizers.Adam(), "b": keras.optimizers.Adam()},
                         step=gan_step()).fit(points(), steps=1, verbose=False)


@pytest.mark.parametrize("task", ["mnist", "higgs"])
def test_graph_counted_flops_of_the_builtin_mlps_match_the_textbook_formula(task):
    from fastcore import tasks
    spec = tasks.TASKS[task].model
    trainer = tasks.trainer_for(tasks.TASKS[task], steps_per_call=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, spec.inputs)).astype(np.float32)
    y = (rng.integers(0, 10, 64).astype(np.int32) if task == "mnist" else
         rng.integers(0, 2, (64, 1)).astype(np.float32))
    result = trainer.fit(x, y, batch_size=32, epochs=1, verbose=False)
    formula = spec.training_flops_per_example()
    assert result.summary["flops_per_example"] == pytest.approx(formula, rel=0.01)
    # the step graph holds less where TensorFlow skips the first layer's input gradient
    assert result.summary["step_graph_flops_per_example"] <= result.summary["flops_per_example"]


def test_a_convolutional_model_under_xla_defaults_to_one_step_per_call():
    """XLA:CPU makes convolutions inside the K-step loop far slower (see fastcore.engine.pathchoice): under
    mode="xla" the default K is 1 for a convnet, and stays the examples-per-call rule in graph mode."""
    def conv():
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                 keras.layers.Dense(1)])
    x, y = np.zeros((512, 8, 8, 1), "float32"), np.zeros((512, 1), "float32")
    xla = fastcore.Trainer(conv, keras.optimizers.SGD(), loss="mse", mode="xla")
    graph = fastcore.Trainer(conv, keras.optimizers.SGD(), loss="mse", mode="graph")
    assert xla.fit(x, y, batch_size=32, epochs=1, verbose=False).summary["steps_per_call"] == 1
    assert graph.fit(x, y, batch_size=32, epochs=1, verbose=False).summary["steps_per_call"] == 16
