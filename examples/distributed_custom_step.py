"""A custom step on tf.distribute: 2 devices of this machine, or 2 worker processes, checked by the distributed twin.

Shows: `fastcore.distribute.use_devices` / `fastcore.distribute.strategy`, `Trainer(..., strategy=...)` with
a model factory (fastcore builds it under the strategy's scope), a step whose loss is summed and divided
by `ctx.global_batch_size` (so the replicas' gradients add up to the global batch's) plus
`ctx.regularization(model)` (already divided by the number of replicas), and `trainer.verify`, which
under a strategy runs the same steps on one device and compares every weight.
  python examples/distributed_custom_step.py               # MirroredStrategy over 2 logical CPU devices
  python examples/distributed_custom_step.py --workers 2   # MultiWorkerMirroredStrategy, 2 local processes
Data: the real HIGGS sample: train[:10000], evaluate on train[10000:] (984 rows).
Target: the distributed twin passes (float32 within 1e-5, every replica identical) and eval accuracy >= 0.60.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import fastcore
import fastcore.distribute
import pipelines
from fastcore import launch

TARGET = 0.60
EPOCHS, BATCH = 5, 500
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def higgs_model():
    return keras.Sequential([keras.Input((28,)),
                             *[keras.layers.Dense(256, activation="elu", kernel_regularizer=keras.regularizers.L2(1e-4))
                               for _ in range(3)],
                             keras.layers.Dense(1)])


def step(batch, ctx):
    x, y = batch   # this replica's slice of the global batch
    model = ctx.model
    with tf.GradientTape() as tape:
        logits = ctx.call(model, x)
        per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        data_loss = tf.reduce_sum(per_example) / ctx.global_batch_size   # not a per-replica mean
        loss = data_loss + ctx.regularization(model)
        scaled = ctx.scale(loss)   # the float16 loss scale (a no-op in float32)
    variables = model.trainable_variables
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), y), tf.float32))
    return fastcore.Update(loss, zip(tape.gradient(scaled, variables), variables),
                           logs={"accuracy": accuracy})   # logs are averaged over replicas, losses summed


def eval_step(batch, ctx):
    x, y = batch
    logits = ctx.call(ctx.model, x)
    return {"accuracy": tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), y), tf.float32)}


def run(data_dir: str, kind: str) -> int:
    # First, before TensorFlow runs any op: 2 logical CPU devices (or 2 GPUs), or the TF_CONFIG cluster.
    strategy = fastcore.distribute.strategy(kind, devices=2 if kind == "mirrored" else None)
    train = pipelines.load("higgs", "train[:10000]", data_dir)
    test = pipelines.load("higgs", "train[10000:]", data_dir)
    trainer = fastcore.Trainer(higgs_model, keras.optimizers.Adam(1e-3), step=step, eval_step=eval_step,
                               strategy=strategy, steps_per_call=4)
    report = trainer.verify(train.x, train.y, batch_size=BATCH, steps=20)
    result = trainer.fit(train.x, train.y, batch_size=BATCH, epochs=EPOCHS, validation_data=(test.x, test.y))
    if not fastcore.distribute.is_chief(strategy):
        return 0
    accuracy, spread = result.history[-1]["eval_accuracy"], result.summary["replica_spread"]
    line = (f"{trainer.engine.replicas} replicas: twin {'PASS' if report.passed else 'FAIL'} "
            f"(worst relative difference {max(d.max_rel for d in report.compiled_vs_eager):.2e}); "
            f"eval accuracy {accuracy:.4f}; replica spread after training {spread}")
    target = f"(target: twin passes, accuracy >= {TARGET}, spread 0.0)"
    if not report.passed or accuracy < TARGET or spread != 0.0:
        print(f"FAILED: {line} {target}")
        return 1
    print(f"{line} {target}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FASTCORE_DATA_DIR") or str(DEFAULT_DATA))
    parser.add_argument("--workers", type=int, default=0, help="start this many worker processes (multi-worker)")
    args = parser.parse_args()
    if os.environ.get("TF_CONFIG"):   # a worker started below
        return run(args.data_dir, "multi-worker")
    if not args.workers:
        return run(args.data_dir, "mirrored")
    ports = launch.free_ports(args.workers)
    procs = [subprocess.Popen([sys.executable, __file__, "--data-dir", args.data_dir],
                              env={**os.environ, "TF_CONFIG": launch.tf_config(ports, i)}) for i in range(args.workers)]
    codes = [p.wait(timeout=600) for p in procs]
    return codes[0] or max(codes)


if __name__ == "__main__":
    sys.exit(main())
