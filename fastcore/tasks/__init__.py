"""The built-in tasks: what to learn, declared as data, and how to make a `fastcore.Trainer` for one.

The CLI and the tests read `TASKS`; `trainer_for` builds each task through the public API, exactly as a
library user would (a model factory, a Keras optimizer, a per-example loss and metric)."""
from __future__ import annotations

import dataclasses

from fastcore.options import MAX_STEPS_PER_CALL
from fastcore.tasks.specs import MLPSpec, Regularization


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    dataset: str                 # a name `pipelines.load` knows
    model: MLPSpec
    loss: str                    # objectives.LOSSES
    metric: str                  # objectives.METRICS
    optimizer: str               # sgd | adam
    learning_rate: float
    batch_size: int | None       # None: full batch (the whole training split in every step)
    epochs: int
    steps_per_call: int          # preferred K; the CLI uses the largest divisor of the epoch's steps <= K
    train_split: str
    eval_split: str


# MNIST tasks take the library's cap (1,875 steps per epoch give K=125). CLI, Fashion-MNIST, 3 epochs, float32,
# 1 thread, 2-core Xeon, runs alternated: K=125 at 1.03-1.41x the examples/s of K=25 (3 pairs; 140k vs 99k,
# 116k vs 113k, 115k vs 84k).
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("line", "line", MLPSpec(1, (), outputs=1, initial_kernel=5.0), "mse", "mse",
         "sgd", 0.1, None, 100, 100, "train", "test"),
    Task("sine", "sine", MLPSpec(1, (10, 10), "relu", 1), "mse", "mse",
         "adam", 1e-3, None, 10000, 500, "train", "test"),
    Task("mnist", "mnist", MLPSpec(784, (100, 50), "relu", 10), "softmax_ce", "accuracy",
         "sgd", 0.1, 32, 5, MAX_STEPS_PER_CALL, "train", "test"),
    Task("fashion_mnist", "fashion_mnist", MLPSpec(784, (100, 50), "relu", 10), "softmax_ce", "accuracy",
         "sgd", 0.1, 32, 5, MAX_STEPS_PER_CALL, "train", "test"),
    Task("higgs", "higgs", MLPSpec(28, (512, 512, 512, 512), "elu", 1), "sigmoid_ce", "binary_accuracy",
         "adam", 1e-3, 500, 20, 20, "train[:90%]", "train[90%:]"),
)}


def make_optimizer(kind: str, learning_rate: float, loss_scaling: bool = False):
    """A Keras optimizer; wrapped in LossScaleOptimizer (dynamic scale, skips non-finite steps) when asked."""
    import keras   # here, not at the top: the CLI reads TASKS for --help before TensorFlow is needed
    optimizer = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[kind](learning_rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def model_factory(task: Task, model_api: str, reg: Regularization, seed: int):
    """A zero-argument factory: the task's model in the Keras dtype policy in force when it is called."""
    def build():
        import keras
        import tensorflow as tf

        from fastcore.tasks import models
        policy = keras.config.dtype_policy()
        return models.build(task.model, model_api, reg, policy.name, tf.as_dtype(policy.compute_dtype), seed)
    return build


def trainer_for(task: Task, *, model_api: str = "keras-functional", reg: Regularization = Regularization(),
                learning_rate: float | None = None, precision: str = "float32", mode: str = "xla",
                steps_per_call: int | None = None, seed: int = 0, preflight: bool = True, strategy=None):
    """A fastcore.Trainer for `task`, made with the public API only."""
    from fastcore.tasks import objectives
    from fastcore.trainer import Trainer
    keras_free = model_api == "module"
    return Trainer(model_factory(task, model_api, reg, seed),
                   make_optimizer(task.optimizer, learning_rate or task.learning_rate),
                   loss=objectives.per_example_loss(task.loss, keras_free),
                   metrics={task.metric: objectives.per_example_metric(task.metric)},
                   precision=precision, mode=mode, steps_per_call=steps_per_call, seed=seed, preflight=preflight,
                   strategy=strategy)
