"""The built-in tasks: what to learn, declared as data. The CLI and tests read `TASKS`."""
from __future__ import annotations

import dataclasses

from fastcore.specs import MLPSpec


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


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("line", "line", MLPSpec(1, (), outputs=1, initial_kernel=5.0), "mse", "mse",
         "sgd", 0.1, None, 100, 100, "train", "test"),
    Task("sine", "sine", MLPSpec(1, (10, 10), "relu", 1), "mse", "mse",
         "adam", 1e-3, None, 10000, 500, "train", "test"),
    Task("mnist", "mnist", MLPSpec(784, (100, 50), "relu", 10), "softmax_ce", "accuracy",
         "sgd", 0.1, 32, 5, 50, "train", "test"),
    Task("fashion_mnist", "fashion_mnist", MLPSpec(784, (100, 50), "relu", 10), "softmax_ce", "accuracy",
         "sgd", 0.1, 32, 5, 50, "train", "test"),
    Task("higgs", "higgs", MLPSpec(28, (512, 512, 512, 512), "elu", 1), "sigmoid_ce", "binary_accuracy",
         "adam", 1e-3, 500, 20, 20, "train[:90%]", "train[90%:]"),
)}


def make_optimizer(kind: str, learning_rate: float, loss_scaling: bool):
    """A Keras optimizer; wrapped in LossScaleOptimizer (dynamic scale, skips non-finite steps) for float16."""
    import keras   # here, not at the top: the CLI reads TASKS for --help before TensorFlow is needed
    optimizer = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[kind](learning_rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer
