"""Plain tf.Variables in a tf.Module, trained by a step function and a Keras optimizer.

Shows: fastcore trains anything with `trainable_variables` (here a tf.Module holding W and b, no Keras
layers); the step function owns the forward pass, the loss and the GradientTape; fastcore compiles it
with XLA, checks it against its eager twin (pre-flight) and applies the gradients with the optimizer.
Data: y = 3x + 2 + noise (numpy, seeded); the model starts at W=5, b=0.
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


class Line(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(5.0, name="W")
        self.b = tf.Variable(0.0, name="b")

    def __call__(self, x):
        return self.w * x + self.b


def step(batch, ctx):
    x, y = batch
    model = ctx.model
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x) - y)) / ctx.global_batch_size
    grads = tape.gradient(loss, [model.w, model.b])
    return fastcore.Update(loss, zip(grads, [model.w, model.b]), logs={"W": model.w, "b": model.b})


def main() -> int:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=1024).astype(np.float32)
    y = (3 * x + 2 + rng.normal(0, 0.1, size=x.shape)).astype(np.float32)

    model = Line()
    trainer = fastcore.Trainer(model, keras.optimizers.SGD(0.1), step=step)
    result = trainer.fit(x, y, batch_size=32, epochs=4)
    w, b = float(model.w.numpy()), float(model.b.numpy())

    if abs(w - 3) > TOLERANCE or abs(b - 2) > TOLERANCE:
        print(f"FAILED: W={w:.4f}, b={b:.4f} not within {TOLERANCE} of W=3, b=2")
        return 1
    print(f"steps {result.summary['steps']}: W {w:.4f} b {b:.4f} |W-3| {abs(w - 3):.4f} "
          f"|b-2| {abs(b - 2):.4f} (target <= {TOLERANCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
