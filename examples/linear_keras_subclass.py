"""A subclassed keras.Model (y = W x + b) trained by your own GradientTape step function.

Shows: `fastcore.Trainer(model, optimizer, step=...)` with a step that computes the loss and gradients
and returns `fastcore.Update` (fastcore applies them); the same model instance trained first by SGD,
then refined by a second Trainer with Adam. Data: y = 3x + 2 + noise (numpy, seeded).
Target: |W - 3| <= 0.05 and |b - 2| <= 0.05.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import fastcore

TOLERANCE = 0.05


class Linear(keras.Model):
    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(1, 1), initializer="zeros", name="W")
        self.b = self.add_weight(shape=(1,), initializer="zeros", name="b")

    def call(self, x):
        return x @ self.w + self.b


def step(batch, ctx):
    """One training step: the mean squared error, its gradients; fastcore applies them."""
    x, y = batch
    model = ctx.model
    with tf.GradientTape() as tape:
        pred = ctx.call(model, x)
        loss = tf.reduce_sum(tf.square(pred - y)) / ctx.global_batch_size
        scaled = ctx.scale(loss)   # a no-op in float32; keeps the step right under float16
    variables = model.trainable_variables
    return fastcore.Update(loss, zip(tape.gradient(scaled, variables), variables))


def main() -> int:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2048, 1)).astype(np.float32)
    y = (3 * x + 2 + rng.normal(0, 0.1, size=x.shape)).astype(np.float32)

    model = Linear()
    for name, optimizer, epochs in (("SGD", keras.optimizers.SGD(0.1), 3),
                                    ("Adam", keras.optimizers.Adam(1e-3), 2)):
        trainer = fastcore.Trainer(model, optimizer, step=step)
        trainer.fit(x, y, batch_size=32, epochs=epochs)
        w, b = float(model.w.numpy()[0, 0]), float(model.b.numpy()[0])
        print(f"after {name}: W {w:.4f}  b {b:.4f}")

    if abs(w - 3) > TOLERANCE or abs(b - 2) > TOLERANCE:
        print(f"FAILED: W={w:.4f}, b={b:.4f} not within {TOLERANCE} of W=3, b=2")
        return 1
    print(f"W {w:.4f} b {b:.4f} |W-3| {abs(w - 3):.4f} |b-2| {abs(b - 2):.4f} (target <= {TOLERANCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
