"""Side-by-side throughput in one process: fastcore's step, Keras `fit`, and a matmul kernel.

Machines here are shared and noisy, so every figure is a median over rounds and every gated
figure is a ratio to something measured in the same run: the calibration kernel (an XLA float32
matmul timed before each round) and Keras `fit` on the same model, data and batches.
"""
from __future__ import annotations

import os
import statistics
import time

import tensorflow as tf

import pipelines
from fastcore.cli import plan as run
from fastcore.observe import calibrate
import keras_baseline as baseline

KERNEL_SIZE = calibrate.SIZE
# Extra seconds of sleep per compiled call: a deliberately slowed step, to show the gate failing.
SLOWDOWN = float(os.environ.get("FASTCORE_BENCH_SLOWDOWN", "0"))


def plan(task: str, data_dir: str, steps_per_call: int = 1, precision: str = "float32", **flags) -> run.Plan:
    return run.plan(run.RunConfig(task, data_dir=data_dir, precision=precision, steps_per_call=steps_per_call,
                                  logdir="/tmp", **flags))


class Kernel:
    """The in-run calibration: GFLOP/s of an XLA float32 matmul using the run's threads."""

    def __init__(self, size: int = KERNEL_SIZE, reps: int = 4):
        self.size, self.reps, self.samples = size, reps, []
        self.matmul = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=True)
        self.a = tf.random.stateless_uniform([size, size], seed=[1, 2])
        self.matmul(self.a, self.a).numpy()

    def sample(self) -> None:
        start = time.perf_counter()
        for _ in range(self.reps):
            out = self.matmul(self.a, self.a)
        out.numpy()
        self.samples.append(2 * self.size ** 3 * self.reps / (time.perf_counter() - start) / 1e9)

    def gflops(self, since: int = 0) -> float:
        """Median of the samples from index `since` on: the rounds of one case, side by side with it."""
        return statistics.median(self.samples[since:])


class Ours:
    """fastcore's step as the plan built it (its mode, and the precision and path `auto` chose), fed by
    its stream or by one reused batch."""

    def __init__(self, p: run.Plan, round_seconds: float):
        self.precision = p.precision   # `auto` resolved as a run resolves it (measured on this step)
        self.step = p.trainer.engine
        self.k = p.steps_per_call
        self.fn = self.step.train_many if self.k > 1 else self.step.train_one
        self.iterator = iter(pipelines.train_stream(p.train, p.batch_size, p.config.seed, self.k))
        self.batch = next(self.iterator)
        start = time.perf_counter()
        self._read(self.fn(self.batch))   # trace + compile
        first = time.perf_counter() - start
        start = time.perf_counter()
        self._read(self.fn(self.batch))
        call = time.perf_counter() - start
        self.compile_seconds = max(first - call, 0.0)
        self.calls = max(1, round(round_seconds / call))
        self.examples_per_round = self.calls * self.k * p.batch_size
        self.streamed, self.reused = [], []

    def _calls(self, next_batch) -> float:
        start = time.perf_counter()
        for _ in range(self.calls):
            logs = self.fn(next_batch())
            if SLOWDOWN:
                time.sleep(SLOWDOWN)
        self._read(logs)
        return self.examples_per_round / (time.perf_counter() - start)

    @staticmethod
    def _read(logs) -> float:
        return float(logs["loss"])

    def streamed_round(self) -> None:
        self.streamed.append(self._calls(lambda: next(self.iterator)))

    def reused_round(self) -> None:
        self.reused.append(self._calls(lambda: self.batch))


def keras_fit(p: run.Plan, jit_compile: bool, steps_per_execution: int, round_seconds: float, rounds: int) -> dict:
    """Keras fit's steady examples/s (median over "epochs" of about round_seconds) and compile time."""
    probe = baseline.keras_fit(p, jit_compile, steps_per_execution, epochs=2, steps_per_epoch=steps_per_execution * 4)
    per_step = p.batch_size / probe["examples_per_sec"]
    steps = steps_per_execution * max(1, round(round_seconds / per_step / steps_per_execution))
    result = baseline.keras_fit(p, jit_compile, steps_per_execution, epochs=rounds + 1, steps_per_epoch=steps)
    return {"examples_per_sec": statistics.median(result["epoch_examples_per_sec"]),
            "compile_seconds": result["compile_seconds"]}
