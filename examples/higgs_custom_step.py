"""HIGGS with a custom step (regularized, with dropout), side by side with Keras `model.fit`.

Shows: a step function whose loss is the mean binary cross-entropy plus the model's L2 penalties
(`ctx.regularization(model)`, i.e. model.losses), with `fastcore.layers.Dropout` (its mask is the same
compiled and eager, so the pre-flight check can compare them) and `ctx.call` (passes training=); an
`eval_step` for validation. The same architecture, data and epochs are then trained by Keras'
`model.fit(jit_compile=True)` as the yardstick.
Data: the real HIGGS sample: train[:10000], evaluate on train[10000:] (984 rows).
Target: fastcore eval accuracy >= 0.60 and within 0.03 of Keras fit's.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import fastcore
import pipelines

TARGET, MAX_GAP = 0.60, 0.03
EPOCHS, BATCH = 15, 500
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def higgs_model() -> keras.Model:
    """28 -> 4 x 512 elu (L2 1e-3, dropout 0.2) -> 1 logit."""
    layers = [keras.Input((28,))]
    for i in range(4):
        layers += [keras.layers.Dense(512, activation="elu", kernel_regularizer=keras.regularizers.L2(1e-3)),
                   fastcore.layers.Dropout(0.2, seed=i)]
    return keras.Sequential(layers + [keras.layers.Dense(1)])


def step(batch, ctx):
    x, y = batch
    model = ctx.model
    with tf.GradientTape() as tape:
        logits = ctx.call(model, x)   # model(x, training=ctx.training): dropout on while training
        per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        data_loss = tf.reduce_sum(per_example) / ctx.global_batch_size
        loss = data_loss + ctx.regularization(model)   # + the L2 penalties (model.losses)
        scaled = ctx.scale(loss)   # the float16 loss scale (a no-op here); inside the tape
    variables = model.trainable_variables
    grads = tape.gradient(scaled, variables)
    return fastcore.Update({"loss": loss, "bce": data_loss}, zip(grads, variables))


def eval_step(batch, ctx):
    x, y = batch
    logits = ctx.call(ctx.model, x)   # training=False: no dropout
    correct = tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), y), tf.float32)
    return {"bce": tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits), "accuracy": correct}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FASTCORE_DATA_DIR") or str(DEFAULT_DATA))
    args = parser.parse_args()
    train = pipelines.load("higgs", "train[:10000]", args.data_dir)
    test = pipelines.load("higgs", "train[10000:]", args.data_dir)

    trainer = fastcore.Trainer(higgs_model, keras.optimizers.Adam(1e-3), step=step, eval_step=eval_step)
    result = trainer.fit(train.x, train.y, batch_size=BATCH, epochs=EPOCHS, validation_data=(test.x, test.y))
    ours = result.history[-1]["eval_accuracy"]

    keras.utils.set_random_seed(0)
    model = higgs_model()
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)], jit_compile=True)
    model.fit(train.x, train.y, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    theirs = model.evaluate(test.x, test.y, batch_size=BATCH, verbose=0, return_dict=True)["binary_accuracy"]

    gap = ours - theirs
    line = f"eval accuracy: fastcore {ours:.4f}  keras fit {theirs:.4f}  gap {gap:+.4f}"
    if ours < TARGET or abs(gap) > MAX_GAP:
        print(f"FAILED: {line} (target: fastcore >= {TARGET}, |gap| <= {MAX_GAP})")
        return 1
    print(f"{line} (target: fastcore >= {TARGET}, |gap| <= {MAX_GAP})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
