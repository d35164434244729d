"""A Keras-free MLP on MNIST: tf.Module + tf.Variable weights, a hand-written loss and optimizer.

Shows: nothing here imports Keras. The model is a tf.Module (784-100-50-10, relu written with
tf.where), the loss a per-example softmax cross-entropy written with tf ops (`loss=` accepts any
callable (y_true, y_pred) -> per-example loss), and the optimizer a tiny tf.Module whose only method
is `apply_gradients(pairs)`: fastcore needs nothing more. Accuracy comes from a metric callable.
Data: the real MNIST test split (the only MNIST split here): train on test[:8000], evaluate on
test[8000:]. Target: eval accuracy >= 0.90.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import fastcore
import pipelines

TARGET = 0.90
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class MLP(tf.Module):
    def __init__(self, sizes=(784, 100, 50, 10), seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        # Named variables: fastcore's reports (pre-flight, verify) list them by name.
        self.layers = [(tf.Variable(rng.normal(0, np.sqrt(2 / n_in), (n_in, n_out)).astype(np.float32), name=f"w{i}"),
                        tf.Variable(tf.zeros([n_out]), name=f"b{i}"))
                       for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]))]

    def __call__(self, x):
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = tf.where(x > 0, x, tf.zeros_like(x))   # relu
        return x


class SGD(tf.Module):
    """Plain gradient descent: all fastcore asks of an optimizer is apply_gradients(pairs)."""

    def __init__(self, learning_rate):
        super().__init__()
        self.learning_rate = learning_rate

    def apply_gradients(self, pairs):
        for grad, var in pairs:
            var.assign_sub(self.learning_rate * grad)


def cross_entropy(labels, logits):
    """Per-example softmax cross-entropy: logsumexp(logits) - logits[label]."""
    top = tf.reduce_max(logits, axis=1, keepdims=True)
    log_sum_exp = tf.squeeze(top, 1) + tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=1))
    return log_sum_exp - tf.gather(logits, tf.cast(labels, tf.int32), batch_dims=1)


def accuracy(labels, logits):
    return tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FASTCORE_DATA_DIR") or str(DEFAULT_DATA))
    args = parser.parse_args()
    train = pipelines.load("mnist", "test[:8000]", args.data_dir)
    test = pipelines.load("mnist", "test[8000:]", args.data_dir)

    trainer = fastcore.Trainer(MLP(), SGD(0.1), loss=cross_entropy, metrics=[accuracy])
    result = trainer.fit(train.x, train.y, batch_size=32, epochs=5, validation_data=(test.x, test.y))
    acc = result.history[-1]["eval_accuracy"]

    if acc < TARGET:
        print(f"FAILED: eval accuracy {acc:.4f} < {TARGET}")
        return 1
    print(f"eval accuracy {acc:.4f} on MNIST test[8000:] (target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
