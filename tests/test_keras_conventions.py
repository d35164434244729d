"""The conventions a Keras `fit` user brings, each compared with Keras itself on the same batches.

Sample and class weights, labels shaped as Keras accepts them, metrics by name and as stateful Metric objects,
multi-input / multi-output models fed with dicts, keras.callbacks, optimizer options. fastcore runs here are
an Engine with the loss step and a Loop (the pieces fit() wires), fed the very batches Keras fit gets.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights

from fastcore import keras_callbacks
from fastcore.engine import feeding, sample_weights
from fastcore.engine.loop import Loop
from fastcore.engine.loss_step import check, loss_eval, loss_step
from fastcore.engine.metrics import Metrics
from fastcore.engine.step import Engine
from fastcore.errors import UsageError

N, B = 256, 32
TOL = 1e-5


def data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype("float32")   # (N,) binary labels
    w = rng.uniform(0.2, 2.0, size=n).astype("float32")
    return x, y, w


def binary_model(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1, activation="sigmoid")])   # (N, 1) output


def two_io_model(seed=1):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, {"out1": keras.layers.Dense(1, name="out1")(h),
                                          "out2": keras.layers.Dense(3, name="out2")(h)})


def fastcore_fit(model, optimizer, loss, train, *, epochs, metrics=None, loss_weights=None, validation=None,
                 k=1, callbacks=(), batch=B):
    """Train as fit() does with loss=: the loss step, its eval, K steps per call, callbacks adapted."""
    shared = Metrics(metrics)
    engine = Engine({"model": model}, {"optimizer": optimizer},
                    loss_step(model, loss, metrics=shared, loss_weights=loss_weights),
                    eval_fn=loss_eval(model, loss, shared, loss_weights=loss_weights), global_batch_size=batch)
    per_epoch = int(train.cardinality())
    stream = train.repeat()
    if k > 1:
        stream = stream.batch(k, drop_remainder=True)
    check(engine, stream.element_spec, stacked=k > 1)
    evaluation = feeding.eval_batches(validation, batch_size=None) if validation is not None else None
    loop = Loop(engine, stream, evaluation, epochs * per_epoch, per_epoch, k, batch)
    loop.callbacks = keras_callbacks.adapt(callbacks, engine, epochs=epochs, steps_per_epoch=per_epoch)
    return loop.run(), loop


def keras_named(history: list[dict]) -> dict:
    """fastcore's per-epoch history as Keras' History.history (train_x -> x, eval_x -> val_x)."""
    rows = [keras_callbacks.keras_logs(row) for row in history]
    return {name: [row[name] for row in rows] for name in rows[0]}


def assert_histories_match(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=TOL, atol=TOL, err_msg=name)


def batches(*arrays, batch=B):
    return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0]).batch(batch)


def test_sample_weights_rank_1_labels_and_metrics_match_keras_fit():
    """(N,) labels for an (N, 1) output, loss by name, per-example weights, metrics by name and as objects:
    the loss and every metric, train and validation, equal Keras fit's history within 1e-5."""
    x, y, w = data()
    xv, yv, wv = data(seed=5, n=250)   # 250: the last validation batch is padded
    metric_spec = lambda: ["accuracy", "mae", keras.metrics.AUC(name="auc"), keras.metrics.Precision(name="precision")]
    reference = binary_model()
    reference.compile(keras.optimizers.SGD(0.1), "binary_crossentropy", metrics=metric_spec())
    theirs = reference.fit(batches(x, y, w), epochs=3, verbose=0, validation_data=batches(xv, yv, wv, batch=100)).history
    history, _ = fastcore_fit(binary_model(), keras.optimizers.SGD(0.1), "binary_crossentropy", batches(x, y, w),
                              epochs=3, metrics=metric_spec(), validation=batches(xv, yv, wv, batch=100), k=4)
    assert_histories_match(keras_named(history), theirs)
    assert theirs["loss"][0] != pytest.approx(theirs["loss"][2], rel=1e-3)   # it trained: the check has teeth


def test_class_weight_matches_keras_for_arrays_and_datasets():
    y_sparse = np.array([0, 1, 2, 1, 0, 3], np.float32)
    cw = {0: 0.5, 1: 2.0, 2: 4.0}   # class 3 missing: weight 1.0
    for y in (y_sparse, y_sparse[:, None], np.eye(4, dtype=np.float32)[y_sparse.astype(int)]):
        expected = class_weight_to_sample_weights(y, cw)
        np.testing.assert_array_equal(sample_weights.for_arrays(y, cw), expected)
        _, _, got = next(iter(sample_weights.for_dataset(tf.data.Dataset.from_tensor_slices((y, y)).batch(6), cw)))
        np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(UsageError, match="not both"):
        sample_weights.check(cw, sample_weight=np.ones(6))
    with pytest.raises(UsageError, match="single output"):
        sample_weights.for_arrays({"a": y_sparse, "b": y_sparse}, cw)
    with pytest.raises(UsageError, match="already yields sample weights"):
        sample_weights.for_dataset(tf.data.Dataset.from_tensor_slices((y_sparse,) * 3).batch(6), cw)


def test_class_weighted_training_matches_keras_fit():
    x, y, _ = data()
    cw = {0: 0.3, 1: 3.0}
    reference = binary_model()
    reference.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    theirs = reference.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0, class_weight=cw).history
    weighted = sample_weights.for_dataset(batches(x, y), cw)
    history, _ = fastcore_fit(binary_model(), keras.optimizers.Adam(0.01), "binary_crossentropy", weighted, epochs=2)
    np.testing.assert_allclose([h["train_loss"] for h in history], theirs["loss"], rtol=TOL)


def test_numpy_sample_weights_travel_with_their_rows():
    x, y, _ = data()
    w = (x[:, 1] ** 2).astype(np.float32)   # a function of the row: a misaligned weight shows
    feed = feeding.training_feed({"a": x, "b": x[:, :2]}, y, sample_weight=w, batch_size=B, steps_per_call=1, seed=0)
    (xb, yb, wb) = next(iter(feed.dataset))
    np.testing.assert_allclose(wb.numpy(), xb["a"].numpy()[:, 1] ** 2, rtol=1e-6)
    evaluation = feeding.eval_batches(x, y, batch_size=100, sample_weight=w)
    (ex, ey, ew), padding = list(evaluation)[-1]
    assert padding.numpy().sum() == N - 200 and np.allclose(ew.numpy()[:N - 200], w[200:])
    with pytest.raises(UsageError, match="different numbers of examples"):
        feeding.training_feed(x, y, sample_weight=w[:10], batch_size=B, steps_per_call=1, seed=0)


def test_multi_input_multi_output_dicts_match_keras_fit():
    """Dict inputs and outputs, a loss and metrics per output name, loss_weights, sample weights: Keras'
    per-output names (out1_loss, out2_accuracy, val_...) and values."""
    rng = np.random.default_rng(3)
    xa, xb = rng.normal(size=(N, 4)).astype("float32"), rng.normal(size=(N, 2)).astype("float32")
    x, y = {"a": xa, "b": xb}, {"out1": (xa[:, 0] + xb[:, 0]).astype("float32"), "out2": (xa[:, 1] > 0).astype("int32")}
    w = rng.uniform(0.2, 2.0, size=N).astype("float32")
    loss = {"out1": "mse", "out2": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    weights, metrics = {"out1": 0.5, "out2": 2.0}, {"out1": ["mae"], "out2": ["accuracy"]}
    # Validation batches of 64 divide the data: Keras weighs each output's loss per batch by the batch's static
    # size, which a dataset's short last batch lacks (it then averages batches unweighted); fastcore counts
    # every example once either way.
    reference = two_io_model()
    reference.compile(keras.optimizers.Adam(0.01), loss=loss, loss_weights=weights, metrics=metrics)
    theirs = reference.fit(batches(x, y, w), epochs=2, verbose=0, validation_data=batches(x, y, w, batch=64)).history
    history, _ = fastcore_fit(two_io_model(), keras.optimizers.Adam(0.01), loss, batches(x, y, w), epochs=2,
                              metrics=metrics, loss_weights=weights, validation=batches(x, y, w, batch=64), k=2)
    assert_histories_match(keras_named(history), theirs)


def test_labels_that_do_not_fit_the_output_are_one_usage_error_before_any_compile():
    x, y, _ = data()
    model = binary_model()
    engine = Engine({"model": model}, {"optimizer": keras.optimizers.SGD(0.1)},
                    loss_step(model, "binary_crossentropy"), global_batch_size=B)
    with pytest.raises(UsageError, match="refuses labels") as e:
        check(engine, batches(x, np.zeros((N, 3), np.float32)).element_spec, stacked=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="not a metric"):
        Metrics([3])


def test_metric_names_resolve_as_keras_compile_does():
    """'accuracy' picks sparse categorical accuracy for int labels and a 3-way output; evaluation with padding
    equals Keras evaluate for it and for stateful metrics."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(250, 4)).astype("float32")
    y = rng.integers(0, 3, size=250).astype("int32")
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    spec = ["accuracy", "acc", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")]
    metrics = Metrics(spec)
    engine = Engine({"model": model}, {"optimizer": keras.optimizers.SGD(0.1)}, loss_step(model, "crossentropy"),
                    eval_fn=loss_eval(model, "crossentropy", metrics), global_batch_size=B)
    from fastcore.engine.loop import evaluate
    ours = evaluate(engine, feeding.eval_batches(x, y, batch_size=64))
    model.compile(loss="crossentropy", metrics=["accuracy", "acc", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
    theirs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert {f"eval_{k}" for k in theirs} == set(ours)
    for name, value in theirs.items():
        assert ours[f"eval_{name}"] == pytest.approx(value, rel=TOL, abs=TOL), name
    assert type(metrics.by_name()["accuracy"]).__name__ == "SparseCategoricalAccuracy"


def test_keras_callbacks_see_keras_logs_and_stop_training_like_keras_fit(tmp_path):
    """EarlyStopping(restore_best_weights) stops at Keras' epoch with Keras' weights; ReduceLROnPlateau lowers
    the run's learning rate as in Keras; CSVLogger writes Keras' columns and values; ModelCheckpoint saves;
    LambdaCallback hooks see Keras' epoch numbers and batch logs."""
    x, y, _ = data()
    xv, yv, _ = data(seed=9, n=128)

    def run(fit):
        seen = {"begin": [], "end": [], "batch_loss": []}
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=1, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=0.05),
            keras.callbacks.CSVLogger(str(tmp_path / f"{fit}.csv")),
            keras.callbacks.ModelCheckpoint(str(tmp_path / f"{fit}.weights.h5"), monitor="val_loss",
                                            save_best_only=True, save_weights_only=True),
            keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen["begin"].append(epoch),
                                           on_epoch_end=lambda epoch, logs: seen["end"].append(sorted(logs)),
                                           on_train_batch_end=lambda batch, logs: seen["batch_loss"].append(logs["loss"])),
        ]
        model, optimizer = binary_model(), keras.optimizers.Adam(0.3)
        if fit == "keras":
            model.compile(optimizer, "binary_crossentropy", metrics=["accuracy"])
            model.fit(batches(x, y), epochs=12, verbose=0, validation_data=batches(xv, yv), callbacks=callbacks)
        else:
            fastcore_fit(model, optimizer, "binary_crossentropy", batches(x, y), epochs=12, metrics=["accuracy"],
                         validation=batches(xv, yv), callbacks=callbacks)
        return model, optimizer, seen, callbacks[0]

    keras_model, keras_opt, keras_seen, keras_stop = run("keras")
    model, optimizer, seen, stop = run("fastcore")
    assert 0 < stop.stopped_epoch == keras_stop.stopped_epoch < 11   # it stopped early, at Keras' epoch
    assert seen["begin"] == keras_seen["begin"] and seen["end"] == keras_seen["end"]
    for ours, theirs in zip(model.get_weights(), keras_model.get_weights()):   # the best epoch's, restored
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert float(optimizer.learning_rate) == pytest.approx(float(keras_opt.learning_rate))
    assert float(optimizer.learning_rate) < 0.3
    assert len(seen["batch_loss"]) == len(keras_seen["batch_loss"])   # one per step here (K=1)
    np.testing.assert_allclose(seen["batch_loss"], keras_seen["batch_loss"], rtol=1e-4)
    with open(tmp_path / "keras.csv") as f, open(tmp_path / "fastcore.csv") as g:
        theirs, ours = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert list(ours[0]) == list(theirs[0]) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for name in b:
            assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-4, abs=1e-5), name
    assert (tmp_path / "fastcore.weights.h5").exists()


def test_terminate_on_nan_ends_the_run_without_an_error_and_without_the_bad_update():
    x, y, _ = data()
    model = binary_model()
    before = [w.copy() for w in model.get_weights()]
    history, loop = fastcore_fit(model, keras.optimizers.SGD(1e30), "mse", batches(x, y * 1e20), epochs=3,
                                 callbacks=[keras.callbacks.TerminateOnNaN()])
    assert loop.stop_training and loop.steps_done < 3 * (N // B)
    assert all(np.isfinite(w).all() for w in model.get_weights()) and len(before) == len(model.get_weights())


def test_optimizer_options_match_keras_fit():
    """use_ema (its averages put into the weights at the end), clipnorm and a learning-rate schedule."""
    x, y, _ = data()

    def optimizer():
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=4, decay_rate=0.5)
        return keras.optimizers.Adam(schedule, clipnorm=0.1, use_ema=True, ema_momentum=0.9)
    reference = binary_model()
    reference.compile(optimizer(), "binary_crossentropy")
    reference.fit(batches(x, y), epochs=2, verbose=0)
    model = binary_model()
    fastcore_fit(model, optimizer(), "binary_crossentropy", batches(x, y), epochs=2, k=4)
    for ours, theirs in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], binary_model().get_weights()[0])


def test_functions_dicts_and_reduced_losses_keep_working():
    """fastcore's own conventions stay: {name: per-example function} metrics, and a loss function that returns
    one value per batch counts for every example (as Keras takes it)."""
    x, y, _ = data()
    y = y[:, None]   # Keras hands metric functions the labels as given (it matches ranks for losses only)
    per_example = lambda y_true, y_pred: tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)
    batch_mean = lambda y_true, y_pred: tf.reduce_mean(tf.square(y_true - y_pred))
    runs = []
    for loss in (per_example, batch_mean):
        history, _ = fastcore_fit(binary_model(), keras.optimizers.SGD(0.1), loss, batches(x, y), epochs=1,
                                  metrics={"sq": per_example}, validation=batches(x, y))
        runs.append(history[-1])
    assert runs[0]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-6)
    assert runs[0]["eval_sq"] == pytest.approx(runs[0]["eval_loss"], rel=1e-6)
