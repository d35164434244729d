"""Everything checkable is checked before the first step: a bad fit/Trainer argument, data the model cannot
take, validation data or metrics that do not fit, a mistake in a user's step, an evaluation set without an
end. Each is one fastcore exception with one line (no ANSI escapes), raised before any training step, with
nothing on stderr (no helper thread's traceback, no TensorFlow log)."""
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore

N, B = 256, 32
ANSI = re.compile("\x1b\\[")


def regression(n=N):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)


def classes(n=N):
    x, _ = regression(n)
    return x, np.random.default_rng(1).integers(0, 3, n)


def dense(units=1):
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])


SPARSE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def regressor(**kw):
    return fastcore.Trainer(dense(), keras.optimizers.SGD(0.01), **{"loss": "mse", "mode": "xla", **kw})


def classifier(**kw):
    return fastcore.Trainer(dense(3), keras.optimizers.SGD(0.01), **{"loss": SPARSE, "mode": "xla", **kw})


def refused(capfd, expected, call, exception=fastcore.UsageError):
    """`call()` raises `exception`, one line holding `expected`, and writes nothing to stderr."""
    capfd.readouterr()
    with pytest.raises(exception) as raised:
        call()
    message, err = str(raised.value), capfd.readouterr().err
    assert expected in message, message
    assert "\n" not in message and not ANSI.search(message), message
    assert err == "", err
    return raised.value


def untrained(trainer):
    """No training step was taken (the engine, when built, counted none)."""
    return trainer.engine is None or int(trainer.engine.steps.numpy()) == 0


# -- a mistake in the user's step: one line, nothing from the pre-flight's helper thread ----------------
OTHER = tf.Variable(1.0, name="not_in_the_model")


def step_returning(update):
    def step(batch, ctx):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ctx.call(ctx.model, x) - y))
        variables = ctx.model.trainable_variables
        return update(loss, tape.gradient(loss, variables), variables, x)
    return step


STEP_MISTAKES = {
    "wrong structure": (lambda loss, g, v, x: (loss, list(zip(g, v))), "the step function returned tuple"),
    "no loss": (lambda loss, g, v, x: fastcore.Update({}, list(zip(g, v))), "returned no loss"),
    "foreign variable": (lambda loss, g, v, x: fastcore.Update(loss, [(tf.ones([]), OTHER)]),
                         "not a trainable variable of the model"),
    "every gradient None": (lambda loss, g, v, x: fastcore.Update(loss, [(None, w) for w in v]),
                            "no gradient for any variable"),
    "an op XLA cannot compile": (
        lambda loss, g, v, x: fastcore.Update(loss + tf.py_function(lambda: 0.0, [], tf.float32), list(zip(g, v))),
        "mode='graph'"),
}


@pytest.mark.parametrize("mistake", list(STEP_MISTAKES))
def test_a_mistake_in_the_step_is_one_line_and_nothing_reaches_stderr(mistake, capfd):
    update, expected = STEP_MISTAKES[mistake]
    x, y = regression()
    trainer = fastcore.Trainer(dense(), keras.optimizers.SGD(0.01), step=step_returning(update), mode="xla")
    refused(capfd, expected, lambda: trainer.fit(x, y, batch_size=B, verbose=False))
    assert untrained(trainer)


NATIVE_LOGS = """
import sys, numpy as np, tensorflow as tf, keras, fastcore
tf.function(lambda t: t * 2, jit_compile=True)(tf.ones([2]))   # TensorFlow's and XLA's start-up lines first
def step(batch, ctx):
    x, y = batch
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(ctx.call(ctx.model, x) - y)) + tf.py_function(lambda: 0.0, [], tf.float32)
    return fastcore.Update(loss, list(zip(tape.gradient(loss, ctx.model.trainable_variables),
                                          ctx.model.trainable_variables)))
x = np.ones((64, 4), np.float32)
trainer = fastcore.Trainer(lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
                           keras.optimizers.SGD(0.01), step=step, mode="xla")
print("MARK", file=sys.stderr, flush=True)
try:
    trainer.fit(x, x[:, :1], batch_size=32, verbose=False)
except fastcore.UsageError as e:
    print(e)
"""


def test_tensorflows_own_log_of_a_failed_compile_on_the_helper_thread_is_not_printed(tmp_path):
    """With TensorFlow's C++ logging on (a library user's default), an XLA compile failing on the
    pre-flight's helper thread logs its op's Python stack; the one line says it all, so that log is held."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    done = subprocess.run([sys.executable, "-c", NATIVE_LOGS], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip().splitlines()[-1].startswith("XLA cannot compile the step: it uses EagerPyFunc"), done
    assert done.stderr.split("MARK\n", 1)[1] == "", done.stderr


def test_every_gradient_none_with_loss_is_refused_in_every_mode(capfd):
    class Frozen(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([4, 1]))

        def __call__(self, x):
            return x @ tf.stop_gradient(self.w)
    x, y = regression()
    for mode in ("eager", "xla"):
        trainer = fastcore.Trainer(Frozen(), keras.optimizers.SGD(0.01), loss="mse", mode=mode, preflight=False)
        refused(capfd, "no gradient for any variable", lambda: trainer.fit(x, y, batch_size=B, verbose=False))


# -- features and labels the model cannot take --------------------------------------------------------
def ragged_rows():
    x, _ = regression()
    return [list(row) for row in x[:-1]] + [list(x[-1][:3])]


def batches(x, y, size=B):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(size, drop_remainder=True)


BAD_DATA = {   # name: (trainer factory, fit kwargs factory, text the one line must hold)
    "string features (arrays)": (regressor, lambda: dict(x=regression()[0].astype(str), y=regression()[1]),
                                 "string"),
    "string features (dataset)": (regressor, lambda: dict(x=batches(regression()[0].astype(str), regression()[1])),
                                  "string"),
    "ragged rows (lists)": (regressor, lambda: dict(x=ragged_rows(), y=regression()[1]), "numpy array"),
    "ragged rows (object array)": (regressor, lambda: dict(x=np.array(ragged_rows(), dtype=object), y=regression()[1]),
                                   "dtype object"),
    "ragged features (dataset)": (regressor, lambda: dict(x=batches(tf.ragged.constant(ragged_rows()), regression()[1])),
                                  "ragged"),
    "wrong-rank features (arrays)": (regressor, lambda: dict(x=regression()[0].reshape(N, 2, 2), y=regression()[1]),
                                     "(32, 2, 2)"),
    "wrong-rank features (dataset)": (regressor, lambda: dict(x=batches(regression()[0][:, 0], regression()[1])),
                                      "(32,)"),
    "wrong-width features (graph)": (lambda: regressor(mode="graph"),
                                     lambda: dict(x=regression()[0][:, :3], y=regression()[1]), "(32, 3)"),
    "labels above the classes (arrays)": (classifier, lambda: dict(x=classes()[0], y=classes()[1] + 2),
                                          "3 classes"),
    "negative labels (arrays)": (classifier, lambda: dict(x=classes()[0], y=classes()[1] - 1), "-1"),
    "labels above the classes (dataset)": (classifier, lambda: dict(x=batches(classes()[0], classes()[1] + 2)),
                                           "3 classes"),
    "labels above the classes (validation)": (
        classifier, lambda: dict(x=classes()[0], y=classes()[1], validation_data=(classes()[0], classes()[1] + 2)),
        "validation"),
    "labels above the classes (validation dataset)": (
        classifier, lambda: dict(x=classes()[0], y=classes()[1],
                                 validation_data=batches(classes()[0], classes()[1] + 2)), "validation"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_data_the_model_cannot_take_is_one_line_before_training(case, capfd):
    make, data, expected = BAD_DATA[case]
    trainer = make()
    kwargs = data()
    kwargs.setdefault("batch_size", B if "y" in kwargs else None)
    refused(capfd, expected, lambda: trainer.fit(**kwargs, verbose=False))
    assert untrained(trainer)


def test_labels_a_loss_can_take_train_as_before():
    x, y = classes()
    result = classifier(metrics=["accuracy"]).fit(x, y, batch_size=B, validation_data=(x, y), verbose=False)
    assert np.isfinite(result.history[-1]["eval_loss"])


# -- validation data and metrics are checked against the model before the first step -----------------
def one_number(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_true - y_pred))


def mse_step(batch, ctx):
    x, y = batch
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(ctx.call(ctx.model, x) - y))
    return fastcore.Update(loss, list(zip(tape.gradient(loss, ctx.model.trainable_variables),
                                          ctx.model.trainable_variables)))


def scalar_eval(batch, ctx):
    x, y = batch
    return {"mse": tf.reduce_mean(tf.square(ctx.call(ctx.model, x) - y))}


VALIDATION = {   # name: (trainer factory, validation data, text of the one line)
    "wrong feature width": (regressor, lambda x, y: (x[:, :3], y), "(256, 3)"),
    "wrong feature rank": (regressor, lambda x, y: (x.reshape(N, 2, 2), y), "(256, 2, 2)"),
    "a metric returning one number": (lambda: regressor(metrics=[one_number]), lambda x, y: (x, y),
                                      "metric 'one_number' returns one number"),
    "an eval_step returning one number": (
        lambda: fastcore.Trainer(dense(), keras.optimizers.SGD(0.01), step=mse_step, eval_step=scalar_eval, mode="xla"),
        lambda x, y: (x, y), "one value per example"),
    "empty arrays": (regressor, lambda x, y: (x[:0], y[:0]), "no examples"),
    "string features": (regressor, lambda x, y: (x.astype(str), y), "string"),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_validation_data_that_does_not_fit_is_refused_before_the_first_step(case, capfd):
    make, validation, expected = VALIDATION[case]
    x, y = regression()
    trainer = make()
    refused(capfd, expected, lambda: trainer.fit(x, y, batch_size=B, epochs=2, validation_data=validation(x, y),
                                                 verbose=False))
    assert untrained(trainer)


def test_the_validation_check_adds_no_trace():
    """Its trace is the evaluation's own: the two evaluations reuse it."""
    x, y = regression()
    trainer = regressor(metrics=["mae"], mode="graph")
    result = trainer.fit(x, y, batch_size=B, epochs=2, validation_data=(x, y), verbose=False)
    assert result.summary["traces"]["eval"] == 1 and len(result.history) == 2


# -- every argument's type and range ------------------------------------------------------------------
FIT_ARGUMENTS = [
    ("batch_size", 0), ("batch_size", -4), ("batch_size", 2.5), ("batch_size", True),
    ("epochs", None), ("epochs", 0), ("epochs", 1.5), ("steps", -1), ("steps_per_epoch", -3),
    ("steps_per_epoch", 0), ("checkpoint_every", -1), ("validation_batch_size", -5), ("validation_batch_size", 0),
    ("validation_steps", 0), ("summary_every", 0), ("profile_steps", 3), ("run_dir", 5), ("resume", "yes"),
]


@pytest.mark.parametrize("name,value", FIT_ARGUMENTS)
def test_a_bad_fit_argument_is_one_line(name, value, capfd):
    x, y = regression()
    kwargs = {"batch_size": B, "validation_data": (x, y), name: value}
    trainer = regressor()
    refused(capfd, f"{name}={value!r}", lambda: trainer.fit(x, y, **kwargs, verbose=False))
    assert trainer.engine is None   # refused before anything was built


TRAINER_ARGUMENTS = [
    ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("steps_per_call", 0), ("steps_per_call", 2.0),
    ("max_shapes", 0), ("mode", "jit"), ("precision", "int8"), ("preflight", "no"),
]


@pytest.mark.parametrize("name,value", TRAINER_ARGUMENTS)
def test_a_bad_trainer_argument_is_one_line(name, value, capfd):
    refused(capfd, f"{name}={value!r}", lambda: regressor(**{name: value}))


def test_an_unknown_loss_name_is_one_line(capfd):
    x, y = regression()
    trainer = regressor(loss="not_a_loss")
    refused(capfd, "not_a_loss", lambda: trainer.fit(x, y, batch_size=B, verbose=False))
    assert untrained(trainer)


# -- an evaluation set without an end ------------------------------------------------------------------
def test_an_endless_validation_set_needs_validation_steps(capfd):
    x, y = regression()
    endless = batches(x, y).repeat()
    trainer = regressor()
    refused(capfd, "validation_steps", lambda: trainer.fit(x, y, batch_size=B, validation_data=endless, verbose=False))
    assert untrained(trainer)


def test_validation_steps_is_honoured():
    x, y = regression()
    trainer = regressor()
    result = trainer.fit(x, y, batch_size=B, validation_data=batches(x, y).repeat(), validation_steps=3,
                         verbose=False)
    seen = 3 * B   # the first three batches, each example once
    expected = float(np.mean((trainer.models["model"](x[:seen]).numpy() - y[:seen]) ** 2))
    assert result.history[-1]["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_an_unknown_length_validation_set_is_counted_once_and_one_that_never_ends_is_refused(capfd, monkeypatch):
    from fastcore.engine import feeding
    x, y = regression(100)
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).batch(B).filter(lambda *element: True)   # filter: TensorFlow cannot know the length
    assert int(unknown.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    evaluation = feeding.eval_batches(unknown, batch_size=None, what="validation")
    weights = sum(float(tf.reduce_sum(w)) for _, w in evaluation)
    assert weights == len(x)   # every example once, the last batch of 4 padded
    monkeypatch.setattr(feeding, "COUNT_SECONDS", 0.5)
    endless = tf.data.Dataset.from_generator(lambda: iter(int, 1), output_signature=tf.TensorSpec((), tf.int64))
    endless = endless.map(lambda _: (x[:B], y[:B]))
    refused(capfd, "had not ended", lambda: feeding.eval_batches(endless, batch_size=None, what="validation"))


@pytest.mark.parametrize("k", [None, 1])   # in the first call (the pre-flight's warm-up runs it), or in the loop
def test_a_label_out_of_range_in_a_later_batch_is_one_data_error_line(capfd, k):
    x, y = classes()
    y = y.copy()
    y[-1] = 7   # the last batch only: the first-batch check passes, the step refuses it in graph mode
    trainer = classifier(mode="graph", steps_per_call=k)
    refused(capfd, "outside the valid range", lambda: trainer.fit(batches(x, y), epochs=1, verbose=False),
            exception=fastcore.DataError)


@pytest.mark.parametrize("k", [None, 1])   # the third batch inside the first call of K, or a call of its own
def test_a_label_out_of_range_in_a_later_batch_under_xla_is_one_data_error_line_naming_step_and_label(capfd, k):
    x, y = classes()
    y = y.copy()
    y[2 * B + 5] = 7   # the third batch: the first-batch check passes; XLA's loss for it is NaN, not an error
    trainer = classifier(steps_per_call=k)
    refused(capfd, "a batch at step 3 has label 7, outside the loss's classes [0, 3)",
            lambda: trainer.fit(batches(x, y), epochs=1, verbose=False), exception=fastcore.DataError)
    assert int(trainer.engine.applied.numpy()) == 2   # the guard applied nothing from the bad batch on


@pytest.mark.parametrize("k", [None, 1])
def test_a_label_out_of_range_in_a_later_batch_under_a_strategy_is_the_same_data_error_line(capfd, k):
    """Under tf.distribute (a one-device MirroredStrategy in-process) the replicas read the global batch, so the
    label check after the guard's stop reads it as a single device does."""
    x, y = classes()
    y = y.copy()
    y[2 * B + 5] = 7
    trainer = classifier(steps_per_call=k, strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))
    refused(capfd, "a batch at step 3 has label 7, outside the loss's classes [0, 3)",
            lambda: trainer.fit(batches(x, y), epochs=1, verbose=False), exception=fastcore.DataError)
    assert int(trainer.engine.applied.numpy()) == 2


def test_a_nan_under_xla_with_every_label_in_range_is_still_the_guards_stop(capfd):
    x, y = classes()
    x = x.copy()
    x[2 * B + 5] = np.inf   # the third batch's loss is NaN; its labels are fine
    trainer = classifier(steps_per_call=1)
    refused(capfd, "was NaN/Inf at step 3", lambda: trainer.fit(batches(x, y), epochs=1, verbose=False),
            exception=fastcore.NonFiniteError)


def test_a_label_the_loss_cannot_take_in_a_later_cli_batch_is_refused_before_training(tmp_path):
    """The CLI's data is checked whole as it loads (so no bad label reaches its guard): exit 2, one line."""
    import gzip
    import struct
    from helpers import cli, one_line
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    labels = bytearray((np.arange(64) % 10).astype(np.uint8))
    labels[40] = 12   # the third batch of 16
    idx = lambda magic, dims, payload: struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in dims) + payload
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(2051, [64, 28, 28], bytes(64 * 28 * 28))))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(2049, [64], bytes(labels))))
    code, out, err = cli("--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--train-split", "test[:48]",
                         "--eval-split", "test[48:]", "--batch-size", "16", "--precision", "float32", "--threads", "1",
                         "--logdir", str(tmp_path / "logs"), "--run-name", "r")
    assert code == 2
    one_line(err, "test[:48]: label 12 outside 0..9")
    assert not (tmp_path / "logs" / "r" / "checkpoints").exists()


def test_a_label_out_of_range_given_to_train_on_batch_under_xla_is_one_data_error_line(capfd):
    x, y = classes()
    trainer = classifier()
    trainer.train_on_batch((x[:B], y[:B]))   # builds (and pre-flights) on a good batch
    bad = y[B:2 * B].copy()
    bad[3] = 7
    refused(capfd, "a batch at step 2 has label 7, outside the loss's classes [0, 3)",
            lambda: trainer.train_on_batch((x[B:2 * B], bad)), exception=fastcore.DataError)
