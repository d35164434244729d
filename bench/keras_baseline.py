"""Keras `model.fit` on the same task, model, data and machine: the yardstick for speed and accuracy (bench and tests only)."""
from __future__ import annotations

import time

import keras

import pipelines
from fastcore import tasks
from fastcore.cli.plan import Plan
from fastcore.tasks import models, objectives


def _keras_objective(task: tasks.Task):
    """The task's loss (the same Keras loss fastcore's step uses, mean-reduced) and its Keras metric."""
    loss = objectives.keras_loss(task.loss)
    metric = {"mse": keras.metrics.MeanSquaredError(name="mse"),
              "accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
              "binary_accuracy": keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0)}[task.metric]
    return loss, metric


def keras_fit(p: Plan, jit_compile: bool = True, steps_per_execution: int = 1, *,
              epochs: int | None = None, steps_per_epoch: int | None = None) -> dict:
    """Train p's model with `fit` (Keras-functional, p's precision) and evaluate it like fastcore does.

    `fit` reads the very batches fastcore's step reads (pipelines.train_stream, one iterator for the
    whole run), so the comparison is of the training step, not of two input pipelines. `epochs` and
    `steps_per_epoch` default to the plan's; benchmarks pass longer "epochs" to time steady state.
    """
    keras.utils.set_random_seed(p.config.seed)
    model = models.build(p.task.model, "keras-functional", models.Regularization(p.config.l2, p.config.dropout),
                         p.precision.policy, p.precision.compute_dtype, p.config.seed)
    loss, metric = _keras_objective(p.task)
    model.compile(optimizer=tasks.make_optimizer(p.task.optimizer, p.learning_rate, p.precision.loss_scaling),
                  loss=loss, metrics=[metric], jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    train = pipelines.train_stream(p.train, p.batch_size, p.config.seed)
    steps_per_epoch = steps_per_epoch or p.steps_per_epoch
    epochs = epochs or p.total_steps // p.steps_per_epoch
    timer = _EpochTimer()
    model.fit(train, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False, callbacks=[timer])
    steady = timer.seconds[1:] or timer.seconds   # the first epoch traces and compiles
    results = model.evaluate(p.eval.x, p.eval.y, batch_size=1024, verbose=0, return_dict=True)
    examples = steps_per_epoch * p.batch_size
    return {"examples_per_sec": len(steady) * examples / sum(steady),
            "epoch_examples_per_sec": [examples / s for s in steady],
            "compile_seconds": max(timer.seconds[0] - min(steady), 0.0),
            "eval": {"loss": results["loss"], p.task.metric: results[p.task.metric]},
            "model": model}


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
