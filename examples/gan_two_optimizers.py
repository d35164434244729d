"""A tiny GAN on 2-D points: two models, two optimizers, one step function; then resume from a checkpoint.

Shows: `models={"gen": ..., "disc": ...}` with `optimizers={"gen": ..., "disc": ...}` (each optimizer is
named after the model it updates); a step that takes both losses' gradients from one persistent
GradientTape (plus a nested tape for an R1 gradient penalty) and returns them by optimizer name; noise
from `fastcore.random.normal(shape, ctx.seed())` (the same compiled and eager, and resumed exactly).
Training writes checkpoints to a run folder; a second Trainer built the same way continues with
`resume=True` (models, optimizers, step counter and the data iterator's position are restored).
Data: real points ~ N((2, 2), 0.5^2), an endless seeded tf.data stream.
Target: the generated points' mean within 0.25 of (2, 2), and both optimizers at the total step count.
"""
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import fastcore

REAL_MEAN, MAX_DISTANCE = np.array([2.0, 2.0], np.float32), 0.25
BATCH, NOISE, FIRST, TOTAL, R1_WEIGHT = 128, 2, 1000, 2000, 10.0


def mlp(out: int) -> keras.Model:
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(32, activation="relu"), keras.layers.Dense(out)])


def step(real, ctx):
    gen, disc = ctx.models["gen"], ctx.models["disc"]
    z = fastcore.random.normal([BATCH, NOISE], ctx.seed())
    bce = tf.nn.sigmoid_cross_entropy_with_logits
    with tf.GradientTape(persistent=True) as tape:
        with tf.GradientTape() as inner:   # R1 penalty: |dD/dx|^2 on real points keeps the GAN from circling
            inner.watch(real)
            real_logits = ctx.call(disc, real)
        r1 = tf.reduce_sum(tf.square(inner.gradient(real_logits, real))) / ctx.global_batch_size
        fake_logits = ctx.call(disc, ctx.call(gen, z))
        d_loss = tf.reduce_sum(bce(labels=tf.ones_like(real_logits), logits=real_logits)
                               + bce(labels=tf.zeros_like(fake_logits), logits=fake_logits)) / ctx.global_batch_size
        g_loss = tf.reduce_sum(bce(labels=tf.ones_like(fake_logits), logits=fake_logits)) / ctx.global_batch_size
        d_scaled, g_scaled = ctx.scale(d_loss + R1_WEIGHT / 2 * r1, "disc"), ctx.scale(g_loss, "gen")
    d_vars, g_vars = disc.trainable_variables, gen.trainable_variables
    d_grads, g_grads = tape.gradient(d_scaled, d_vars), tape.gradient(g_scaled, g_vars)
    return fastcore.Update(loss={"d_loss": d_loss, "g_loss": g_loss}, logs={"r1": r1},
                           gradients={"disc": zip(d_grads, d_vars), "gen": zip(g_grads, g_vars)})


def real_points() -> tf.data.Dataset:
    points = np.random.default_rng(0).normal(REAL_MEAN, 0.5, size=(8192, 2)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(points).repeat().shuffle(8192, seed=0).batch(BATCH, drop_remainder=True)


def trainer_and_optimizers():
    optimizers = {"gen": keras.optimizers.Adam(1e-3, beta_1=0.5), "disc": keras.optimizers.Adam(1e-3, beta_1=0.5)}
    models = {"gen": lambda: mlp(2), "disc": lambda: mlp(1)}   # factories: built (seeded) by fastcore
    return fastcore.Trainer(models, optimizers, step=step), optimizers


def main() -> int:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, _ = trainer_and_optimizers()
        trainer.fit(real_points(), steps=FIRST, steps_per_epoch=250, run_dir=run_dir, checkpoint_every=250)

        print(f"-- a new Trainer resumes from {run_dir}/checkpoints and trains to step {TOTAL}")
        trainer, optimizers = trainer_and_optimizers()
        result = trainer.fit(real_points(), steps=TOTAL, steps_per_epoch=250, run_dir=run_dir,
                             checkpoint_every=250, resume=True)
        print(f"resumed from step {result.summary['resumed_from_step']} "
              f"({os.path.basename(result.summary['resumed_from'])})")

    fake = trainer.models["gen"](fastcore.random.normal([4096, NOISE], tf.constant([7, 7], tf.int64))).numpy()
    distance = float(np.linalg.norm(fake.mean(axis=0) - REAL_MEAN))
    iterations = {name: int(opt.iterations.numpy()) for name, opt in optimizers.items()}
    line = (f"generated mean ({fake.mean(0)[0]:.3f}, {fake.mean(0)[1]:.3f}) std {fake.std(0).mean():.3f}, "
            f"distance to (2, 2) {distance:.3f} (target <= {MAX_DISTANCE}); optimizer iterations {iterations} "
            f"(expected {TOTAL})")
    if distance > MAX_DISTANCE or any(n != TOTAL for n in iterations.values()):
        print(f"FAILED: {line}")
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
