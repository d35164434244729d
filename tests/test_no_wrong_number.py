"""No wrong number: every figure fit reports is the figure of the examples and steps it names.

A skipped float16 step changes no variable (BatchNormalization's statistics included) and is left out of the
epoch's loss; a checkpoint is never written holding a NaN/Inf in any variable; evaluation counts every example
once, with its sample weight (compared with Keras' evaluate); a NaN diagnostic log or evaluation figure is
reported, never fatal and never silent; a second fit on one Trainer numbers its checkpoints by the optimizer
step, and resume counts the same way.
"""
from __future__ import annotations

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.callbacks import Callback
from fastcore.engine import checkpoint

N, B = 256, 32


def regression(seed=0, n=N, inf_row: int | None = None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, :1] + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    if inf_row is not None:
        x[inf_row, 0] = np.inf
    return x, y


def mlp(batch_norm: bool = False):
    def make():
        keras.utils.set_random_seed(0)
        layers = [keras.Input((8,)), keras.layers.Dense(16)]
        layers += [keras.layers.BatchNormalization()] if batch_norm else []
        return keras.Sequential(layers + [keras.layers.ReLU(), keras.layers.Dense(1)])
    return make


def checkpoint_floats(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name, dtype in reader.get_variable_to_dtype_map().items()
            if dtype.is_floating}


def assert_checkpoints_finite(run_dir: str) -> list[str]:
    prefixes = checkpoint.on_disk(os.path.join(run_dir, "checkpoints"))
    assert prefixes
    for prefix in prefixes:
        bad = [name for name, value in checkpoint_floats(prefix).items() if not np.isfinite(value).all()]
        assert not bad, f"{prefix} holds NaN/Inf in {bad}"
    return prefixes


def make_trainer(model, optimizer, mode: str = "graph", **kwargs) -> fastcore.Trainer:
    """A Trainer on one compiled path (no timing of paths: these tests are about figures, not speed)."""
    return fastcore.Trainer(model, optimizer, mode=mode, **kwargs)


class CallLogs(Callback):
    """Each call's logs, read."""

    def __init__(self):
        self.calls = []

    def on_call_end(self, loop, logs) -> None:
        self.calls.append({name: float(value) for name, value in logs.items()})


# -- float16: a skipped step -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, k", [("xla", 4), ("graph", 1)])
def test_a_skipped_float16_step_leaves_batch_norm_statistics_and_every_checkpoint_finite(tmp_path, mode, k):
    x, y = regression(inf_row=37)
    xv, yv = regression(seed=1, n=64)
    trainer = make_trainer(mlp(batch_norm=True), keras.optimizers.SGD(0.01), mode, loss="mse",
                           precision="float16", steps_per_call=k)
    result = trainer.fit(x, y, batch_size=B, epochs=2, validation_data=(xv, yv), run_dir=str(tmp_path),
                         verbose=False)
    assert result.summary["skipped_steps"] >= 2   # the Inf example's batch, once per epoch
    assert all(math.isfinite(h["eval_loss"]) for h in result.history)
    assert len(assert_checkpoints_finite(str(tmp_path))) == 2
    statistics = [v for v in trainer.models["model"].variables if "moving_" in v.path]
    assert statistics and all(np.isfinite(v.numpy()).all() for v in statistics)


@pytest.mark.parametrize("k", [1, 4])
def test_a_skipped_float16_step_is_left_out_of_the_epoch_loss_and_counted(tmp_path, k):
    x, y = regression(inf_row=37)
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"], precision="float16",
                           steps_per_call=k)
    calls = CallLogs()
    result = trainer.fit(x, y, batch_size=B, epochs=2, run_dir=str(tmp_path), verbose=False, callbacks=[calls])
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["train_mae"]) for h in result.history), \
        result.history
    assert not any("non_finite" in h for h in result.history)
    skipped = [h.get("skipped_steps", 0) for h in result.history]
    assert all(s >= 1 for s in skipped) and sum(skipped) == result.summary["skipped_steps"]
    if k == 1:   # each call is one step: the epoch's loss is the mean over the applied ones
        per_epoch = N // B
        for epoch, h in enumerate(result.history):
            losses = [c["loss"] for c in calls.calls[epoch * per_epoch:(epoch + 1) * per_epoch]]
            applied = [v for v in losses if math.isfinite(v)]
            assert len(applied) == per_epoch - skipped[epoch]
            assert h["train_loss"] == pytest.approx(np.mean(applied), rel=1e-5)


def test_a_nan_diagnostic_log_does_not_make_a_float16_step_skip():
    x, y = regression()

    def step(batch, ctx):
        xb, yb = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(ctx.call(ctx.model, xb), tf.float32) - yb))
            scaled = ctx.scale(loss)
        grads = tape.gradient(scaled, ctx.model.trainable_variables)
        return fastcore.Update(loss, zip(grads, ctx.model.trainable_variables), logs={"ratio": tf.constant(np.nan)})
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.01), step=step, precision="float16", steps_per_call=1)
    with pytest.warns(RuntimeWarning, match="epoch 1: train_ratio is NaN/Inf"):   # verbose=False: a warning
        result = trainer.fit(x, y, batch_size=B, epochs=1, verbose=False)
    assert result.summary["skipped_steps"] <= 1   # at most the loss scaler's first overflow, not every step
    assert math.isfinite(result.history[0]["train_loss"])


# -- the checkpoint check covers every variable --------------------------------------------------------------
class Poison(Callback):
    """At the end of the run's last call (before its checkpoint), a NaN in the variables `pick` chooses."""

    def __init__(self, pick):
        self.pick = pick

    def on_call_end(self, loop, logs) -> None:
        if loop.steps_done >= loop.total_steps:
            for v in self.pick(loop.engine):
                v.assign(tf.fill(tf.shape(v), tf.constant(np.nan, v.dtype)))


@pytest.mark.parametrize("where", ["moving statistics", "optimizer state"])
def test_a_checkpoint_is_never_written_with_a_nan_in_any_variable(tmp_path, capsys, where):
    pick = {"moving statistics": lambda e: [v for v in e.model_variables if "moving_mean" in v.path],
            "optimizer state": lambda e: [v for v in e.optimizer.variables if "momentum" in v.path]}[where]
    x, y = regression()
    trainer = make_trainer(mlp(batch_norm=True), keras.optimizers.SGD(0.01, momentum=0.9), loss="mse",
                           steps_per_call=1)
    result = trainer.fit(x, y, batch_size=B, epochs=2, run_dir=str(tmp_path), callbacks=[Poison(pick)])
    assert pick(trainer.engine) and all(np.isnan(v.numpy()).all() for v in pick(trainer.engine))
    prefixes = assert_checkpoints_finite(str(tmp_path))
    assert [os.path.basename(p) for p in prefixes] == ["ckpt-8"]   # the epoch-2 save was refused
    refused = result.summary["failed_checkpoint_saves"]
    assert len(refused) == 1 and "step 16" in refused[0] and "NaN/Inf" in refused[0]
    assert refused[0] in capsys.readouterr().out   # said, in one line


# -- evaluation: every example once, with its weight -------------------------------------------------------------
def relative_error(y_true, y_pred):
    return tf.abs(y_true - y_pred) / y_true   # finite on every real example (y >= 1), not on a zero row


def positive_regression(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, rng.uniform(1.0, 2.0, size=(n, 1)).astype("float32")


def keras_reference(x, y):
    model = mlp()()
    model.compile(keras.optimizers.SGD(0.0), "mse", metrics=[relative_error])
    return model


@pytest.mark.parametrize("validation", ["arrays", "dataset"])
def test_a_padded_last_evaluation_batch_reaches_no_metric(validation):
    x, y = positive_regression(0, N)
    xv, yv = positive_regression(1, 50)   # batches of 16: the last holds 2 real rows and 14 padding
    data = (xv, yv) if validation == "arrays" else tf.data.Dataset.from_tensor_slices((xv, yv)).batch(16)
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.0), loss="mse", metrics=[relative_error])
    result = trainer.fit(x, y, batch_size=B, epochs=1, validation_data=data, validation_batch_size=16, verbose=False)
    true_mean = float(np.mean(np.abs(yv - trainer.predict(xv)) / yv))
    assert result.history[0]["eval_relative_error"] == pytest.approx(true_mean, rel=1e-5)
    assert trainer.evaluate(xv, yv, batch_size=16)["relative_error"] == pytest.approx(true_mean, rel=1e-5)
    theirs = keras_reference(x, y).evaluate(xv, yv, batch_size=16, verbose=0, return_dict=True)
    assert result.history[0]["eval_loss"] == pytest.approx(theirs["loss"], rel=1e-5)


@pytest.mark.parametrize("validation", ["arrays", "dataset"])
def test_validation_sample_weights_are_used_as_keras_uses_them(validation):
    x, y = regression()
    xv, yv = regression(seed=1, n=50)
    wv = np.random.default_rng(2).uniform(0.0, 1.0, size=50).astype("float32")
    data = (xv, yv, wv) if validation == "arrays" else tf.data.Dataset.from_tensor_slices((xv, yv, wv)).batch(16)
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.0), loss="mse", weighted_metrics=["mae"])
    ours = trainer.fit(x, y, batch_size=B, epochs=1, validation_data=data, validation_batch_size=16,
                       verbose=False).history[0]
    reference = mlp()()
    reference.compile(keras.optimizers.SGD(0.0), "mse", weighted_metrics=["mae"])
    theirs = reference.evaluate(xv, yv, sample_weight=wv, batch_size=16, verbose=0, return_dict=True)
    unweighted = reference.evaluate(xv, yv, batch_size=16, verbose=0, return_dict=True)
    assert ours["eval_loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["eval_mae"] == pytest.approx(theirs["mae"], rel=1e-5)
    assert abs(ours["eval_loss"] - unweighted["loss"]) > 0.05   # the weights matter here


# -- a NaN figure that is not a loss or gradient: reported, not fatal ------------------------------------------------
def precision_step(batch, ctx):
    """Logs a precision that is 0/0 = NaN while the model predicts no positive (every step here)."""
    xb, yb = batch
    with tf.GradientTape() as tape:
        logits = ctx.call(ctx.model, xb)
        loss = tf.reduce_mean(tf.square(logits - 10.0 * yb))
    grads = tape.gradient(loss, ctx.model.trainable_variables)
    predicted = tf.cast(logits > 1e6, tf.float32)
    precision = tf.reduce_sum(predicted * yb) / tf.reduce_sum(predicted)
    return fastcore.Update(loss, zip(grads, ctx.model.trainable_variables), logs={"precision": precision})


def test_a_nan_diagnostic_log_is_reported_and_the_run_goes_on(tmp_path, capsys):
    x, y = regression()
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.01), step=precision_step)
    result = trainer.fit(x, y, batch_size=B, epochs=2, run_dir=str(tmp_path))
    assert result.summary["steps"] == 2 * N // B and result.summary["skipped_steps"] == 0
    assert all(np.isfinite(v.numpy()).all() for v in trainer.models["model"].variables)
    assert [h["non_finite"] for h in result.history] == [["train_precision"], ["train_precision"]]
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "train_precision" in warnings[0] and "training goes on" in warnings[0]
    assert result.summary["non_finite_figures"] == ["epoch 1: train_precision", "epoch 2: train_precision"]


def test_a_nan_evaluation_loss_is_reported_not_returned_as_a_figure(tmp_path, capsys):
    x, y = regression()
    xv, yv = regression(seed=1, n=64)
    xv[5, 3] = np.inf
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.01), loss="mse")
    result = trainer.fit(x, y, batch_size=B, epochs=1, validation_data=(xv, yv), run_dir=str(tmp_path))
    assert not math.isfinite(result.history[0]["eval_loss"]) and result.history[0]["non_finite"] == ["eval_loss"]
    said = capsys.readouterr().out
    assert [line for line in said.splitlines() if line.startswith("warning:")] == [
        "warning: epoch 1: eval_loss is NaN/Inf (labels the loss cannot take, or NaN/Inf in the validation "
        "data or weights); the history marks it (non_finite)"]
    assert result.summary["non_finite_figures"] == ["epoch 1: eval_loss"]
    with pytest.warns(RuntimeWarning, match="evaluate: loss is NaN/Inf"):
        assert not math.isfinite(trainer.evaluate(xv, yv)["loss"])


# -- a second fit on one Trainer ---------------------------------------------------------------------------------
def checkpoint_steps(run_dir: str) -> dict[int, int]:
    """{N of ckpt-N: the step counter it holds}."""
    return {int(os.path.basename(p).split("-")[1]): checkpoint.read_meta(p)["steps"]
            for p in checkpoint.on_disk(os.path.join(run_dir, "checkpoints"))}


def test_a_second_fit_numbers_its_checkpoints_by_the_optimizer_step_and_resume_counts_alike(tmp_path, capsys):
    x, y = regression()
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    trainer = make_trainer(mlp(), keras.optimizers.SGD(0.01), loss="mse")
    trainer.fit(x, y, batch_size=B, epochs=1, run_dir=first, verbose=False)
    again = trainer.fit(x, y, batch_size=B, epochs=1, run_dir=second, verbose=False)   # 8 more steps, as Keras
    assert checkpoint_steps(first) == {8: 8} and checkpoint_steps(second) == {16: 16}
    assert again.summary["steps"] == 16 and [h["steps"] for h in again.history] == [16]
    assert int(trainer.engine.optimizer.iterations.numpy()) == 16

    def resumed(epochs):
        fresh = make_trainer(mlp(), keras.optimizers.SGD(0.01), loss="mse")
        return fresh.fit(x, y, batch_size=B, epochs=epochs, run_dir=second, resume=True)
    capsys.readouterr()
    done = resumed(2)   # the run in `second` is at step 16 = 2 epochs: complete, and it says so consistently
    assert "is at step 16 of 16" in capsys.readouterr().out and done.summary["steps"] == 16
    longer = resumed(3)
    assert longer.summary["steps"] == 24 and longer.summary["resumed_from_step"] == 16
    assert checkpoint_steps(second) == {16: 16, 24: 24}
