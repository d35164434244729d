"""y = sin(x) fitted by a Keras Sequential and a Keras Functional MLP, with `loss=` (fastcore writes the step).

Shows: the simplest use, `fastcore.Trainer(model, optimizer, loss=keras.losses.MeanSquaredError())`, for
both Keras model-building APIs; full-batch training where an "epoch" is one step, so `steps_per_epoch`
sets how often to evaluate and `steps_per_call` how many steps run inside one compiled XLA call.
Data: x uniform in [-pi, pi] (numpy, seeded), evaluated on an even grid. 1-10-10-1 relu, Adam.
Target: eval MSE <= 1e-3 for both models.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import fastcore

TARGET = 1e-3
STEPS, EVAL_EVERY = 2000, 500


def sequential() -> keras.Model:
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(10, activation="relu"),
                             keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)])


def functional() -> keras.Model:
    inputs = keras.Input((1,))
    h = keras.layers.Dense(10, activation="relu")(inputs)
    h = keras.layers.Dense(10, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def main() -> int:
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, size=(1024, 1)).astype(np.float32)
    x_test = np.linspace(-np.pi, np.pi, 1000, dtype=np.float32).reshape(-1, 1)
    y, y_test = np.sin(x), np.sin(x_test)

    results = {}
    for name, factory in (("sequential", sequential), ("functional", functional)):
        print(f"-- {name}")
        trainer = fastcore.Trainer(factory, keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError(),
                                   steps_per_call=100)
        fit = trainer.fit(x, y, batch_size=len(x), steps=STEPS, steps_per_epoch=EVAL_EVERY,
                          validation_data=(x_test, y_test))
        results[name] = fit.history[-1]["eval_loss"]

    line = "  ".join(f"{name} eval mse {mse:.2e}" for name, mse in results.items())
    if max(results.values()) > TARGET:
        print(f"FAILED: {line} (target <= {TARGET:g})")
        return 1
    print(f"{line} (target <= {TARGET:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
