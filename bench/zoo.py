"""The model zoo: the model families users bring, each trained side by side in one process.

Per family: Keras `fit` as a plain graph and with `jit_compile=True`, each at 1 and 32 steps per
execution (the best of the four is "Keras best"); fastcore's default (`mode="auto"`: it times its
compiled paths on the first batches and keeps the fastest) and its `mode="xla"` and `mode="graph"`;
for a model of Dense layers only (the two MLPs), the dots ceiling (`DotsCeiling`: the step's matrix
products alone, the most any training step of those shapes can reach).
Rounds are interleaved (each runner trains about `round_seconds` per round, the order rotating), so
a neighbour's load hits every runner alike; a runner's figure is the median of its rounds, a ratio the
median of its per-round ratios (`paired`). Data are
seeded synthetic arrays of the real shapes. JAX + optax (`../shared/tools/jax_anchor.py`, the two
MLPs) runs in its own venv as a subprocess: jax must not be installed beside TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import statistics
import subprocess
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import fastcore

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_PYTHON = os.environ.get("FASTCORE_JAX_PYTHON") or str(ROOT.parent / "jaxvenv" / "bin" / "python")
JAX_ANCHOR = ROOT.parent / "shared" / "tools" / "jax_anchor.py"
SEED = 0


@dataclasses.dataclass(frozen=True)
class Family:
    """One zoo model: its Keras-functional factory, optimizer, loss, batch and data."""
    name: str
    build: Callable[[], keras.Model]
    optimizer: Callable[[], keras.optimizers.Optimizer]
    loss: Callable[[], keras.losses.Loss]
    batch_size: int
    examples: int                                        # the real training set's size
    arrays: Callable[[np.random.Generator, int], tuple]  # (x, y) of the real shapes and dtypes
    jax: str | None = None                               # jax_anchor.py's name for the same model

    def tiny(self, examples: int, batch_size: int) -> "Family":
        """The same model on fewer examples and a smaller batch (the smoke cases)."""
        return dataclasses.replace(self, examples=examples, batch_size=batch_size)


# -- the models --------------------------------------------------------------------------------------------
def mnist_mlp() -> keras.Model:
    x = inputs = keras.Input((784,))
    for units in (100, 50):
        x = keras.layers.Dense(units, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def higgs_mlp() -> keras.Model:
    x = inputs = keras.Input((28,))
    for _ in range(4):
        x = keras.layers.Dense(512, activation="elu")(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


def bn_convnet() -> keras.Model:
    """The Keras "Simple MNIST convnet" with BatchNormalization after each convolution."""
    x = inputs = keras.Input((28, 28, 1))
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def text_conv() -> keras.Model:
    inputs = keras.Input((200,), dtype="int32")
    x = keras.layers.Embedding(20000, 64)(inputs)
    x = keras.layers.Conv1D(64, 5, activation="relu")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


class TokenAndPosition(keras.layers.Layer):
    """Token embedding plus a learned position embedding (the Keras transformer text example's layer)."""

    def __init__(self, vocabulary: int, length: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocabulary, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(keras.ops.shape(x)[-1]))


def small_transformer() -> keras.Model:
    inputs = keras.Input((64,), dtype="int32")
    x = TokenAndPosition(8000, 64, 64)(inputs)
    for _ in range(2):
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.MultiHeadAttention(4, 16)(x, x))
        ffn = keras.layers.Dense(64)(keras.layers.Dense(128, activation="relu")(x))
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + ffn)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def _features(shape, classes, binary=False, pixels=False):
    """Pixels uniform in [0, 1) as the Keras examples scale them; other features standard normal."""
    def arrays(rng, n):
        x = rng.random((n, *shape), dtype=np.float32) if pixels else rng.standard_normal((n, *shape), dtype=np.float32)
        return x, _labels(rng, n, classes, binary)
    return arrays


def _tokens(vocabulary, length, classes, binary=False):
    def arrays(rng, n):
        return rng.integers(0, vocabulary, (n, length), dtype=np.int32), _labels(rng, n, classes, binary)
    return arrays


def _labels(rng, n, classes, binary):
    y = rng.integers(0, classes, n)
    return y.astype(np.float32).reshape(n, 1) if binary else y.astype(np.int32)


def _sparse_ce(from_logits=True):
    return lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _binary_ce():
    return keras.losses.BinaryCrossentropy(from_logits=True)


FAMILIES = {f.name: f for f in (
    Family("mnist_mlp", mnist_mlp, lambda: keras.optimizers.SGD(0.1), _sparse_ce(), 32, 60000,
           _features((784,), 10, pixels=True), jax="mnist-mlp"),
    Family("higgs_mlp", higgs_mlp, lambda: keras.optimizers.Adam(1e-3), _binary_ce, 500, 100000,
           _features((28,), 2, binary=True), jax="higgs-mlp"),
    Family("bn_convnet", bn_convnet, keras.optimizers.Adam, _sparse_ce(from_logits=False), 128, 60000,
           _features((28, 28, 1), 10, pixels=True)),
    Family("text_conv", text_conv, keras.optimizers.Adam, _binary_ce, 64, 25000, _tokens(20000, 200, 2, binary=True)),
    Family("small_transformer", small_transformer, keras.optimizers.Adam, _sparse_ce(), 64, 25000,
           _tokens(8000, 64, 2)),
)}


# -- the runners -------------------------------------------------------------------------------------------
class KerasFit:
    """`model.fit` for one round at a time on a shared infinite dataset (its train function is kept between
    calls); a round's time is its epoch's, from on_epoch_begin to on_epoch_end."""

    def __init__(self, family: Family, dataset: tf.data.Dataset, jit_compile: bool, steps_per_execution: int,
                 round_seconds: float):
        self.name = f"keras_{'xla' if jit_compile else 'graph'}_spe{steps_per_execution}"
        self.family, self.dataset = family, dataset
        keras.utils.set_random_seed(SEED)
        self.model = family.build()
        self.model.compile(optimizer=family.optimizer(), loss=family.loss(), jit_compile=jit_compile,
                           steps_per_execution=steps_per_execution)
        self.timer = _EpochTimer()
        start = time.perf_counter()
        self._fit(steps_per_execution)   # trace + compile
        self.compile_seconds = time.perf_counter() - start
        per_step = self._fit(steps_per_execution) / steps_per_execution
        self.steps = steps_per_execution * max(1, round(round_seconds / per_step / steps_per_execution))
        self.compile_seconds = max(self.compile_seconds - steps_per_execution * per_step, 0.0)
        self.rates: list[float] = []

    def _fit(self, steps: int) -> float:
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[self.timer])
        return self.timer.seconds

    def round(self) -> None:
        self.rates.append(self.steps * self.family.batch_size / self._fit(self.steps))

    def warm(self) -> None:
        self._fit(self.steps)


class _CompiledCalls:
    """A runner timing a compiled call of K steps of `family.batch_size` examples: `_calls(n)` runs n calls and
    reads a result back (the host sync that ends the timing); `_size` compiles and sizes a round."""
    family: Family
    k: int

    def _calls(self, n: int) -> float:
        raise NotImplementedError

    def _size(self, round_seconds: float) -> None:
        start = time.perf_counter()
        self._calls(1)   # trace + compile
        first = time.perf_counter() - start
        call = self._timed(1)
        self.compile_seconds = max(first - call, 0.0)
        self.calls = max(1, round(round_seconds / call))
        self.rates: list[float] = []

    def _timed(self, n: int) -> float:
        start = time.perf_counter()
        self._calls(n)
        return (time.perf_counter() - start) / n

    def round(self) -> None:
        self.rates.append(self.k * self.family.batch_size / self._timed(self.calls))

    def warm(self) -> None:
        self._calls(1)


class Fastcore(_CompiledCalls):
    """fastcore's compiled training call as `Trainer.fit` runs it (the path and K the Trainer chose), fed by
    the Trainer's own stream of the arrays."""

    def __init__(self, family: Family, x, y, mode: str, round_seconds: float):
        self.name = f"fastcore_{mode}"
        self.family = family
        self.trainer = fastcore.Trainer(family.build, family.optimizer(), loss=family.loss(), mode=mode, seed=SEED)
        start = time.perf_counter()
        feed = self.trainer.feed(x, y, batch_size=family.batch_size)   # mode="auto" times its paths here
        engine = self.trainer.build(feed)
        self.choose_seconds = time.perf_counter() - start
        self.k = self.trainer.path.steps_per_call
        self.fn = engine.train_many if self.k > 1 else engine.train_one
        self.iterator = iter(feed.dataset)
        self._size(round_seconds)

    def _calls(self, n: int) -> float:
        for _ in range(n):
            logs = self.fn(next(self.iterator))
        return float(logs["loss"])

    @property
    def path(self) -> str:
        return f"{self.trainer.run_mode} K={self.k}"


class DotsCeiling(_CompiledCalls):
    """The honest ceiling of a Dense-only model's step: a compiled K-step loop of ONLY its matrix products,
    in the model's own shapes and dtype (per layer: forward x@W, input gradient dY@W^T but for the first
    layer, weight gradient x^T@dY), with no activation, loss, optimizer or input cost. A big square matmul
    is no ceiling for a batch-32 step; this is. Each step's weight gradients are added (scaled far down) to
    the carried weights, so every product feeds the next step and XLA can neither hoist nor drop one."""

    name = "dots_ceiling"   # its own interleave group: never Keras best nor fastcore
    SCALE = 1e-6            # keeps the carried weights near their start over K steps (no overflow, no denormals)

    def __init__(self, family: Family, x, kernels: list, k: int, round_seconds: float):
        self.family, self.k = family, k
        dtype = kernels[0].dtype
        self.x = tf.constant(x[:family.batch_size], dtype)
        self.kernels = kernels
        self.fn = tf.function(self._steps, jit_compile=True)
        self._size(round_seconds)

    def _steps(self, x, kernels):
        scale = tf.constant(self.SCALE / self.family.batch_size, x.dtype)

        def step(i, weights):
            h = [x]
            for w in weights:
                h.append(tf.matmul(h[-1], w))
            dy, updated = h[-1], list(weights)
            for n in reversed(range(len(weights))):
                updated[n] = weights[n] - scale * tf.matmul(h[n], dy, transpose_a=True)
                if n:
                    dy = tf.matmul(dy, weights[n], transpose_b=True)
            return i + 1, updated

        _, weights = tf.while_loop(lambda i, _: i < self.k, step, (tf.constant(0), list(kernels)))
        return tf.add_n([tf.reduce_sum(w) for w in weights])

    def _calls(self, n: int) -> float:
        for _ in range(n):
            out = self.fn(self.x, self.kernels)
        return float(out)


def dense_kernels(model: keras.Model) -> list[tf.Tensor] | None:
    """A model's Dense kernels (first layer first) as fixed tensors, or None unless it is made of Dense layers
    only: only then is its step nothing but those matrix products and elementwise work."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or not all(isinstance(layer, keras.layers.Dense) for layer in layers):
        return None
    return [tf.constant(keras.ops.convert_to_numpy(layer.kernel)) for layer in layers]


def keras_dataset(x, y, batch_size: int) -> tf.data.Dataset:
    """Keras fit's best input: seeded random batches gathered in tf.data, prefetched, never refilled."""
    n, xs, ys = len(x), tf.constant(x), tf.constant(y)
    return (tf.data.Dataset.random(seed=SEED).batch(batch_size, drop_remainder=True)
            .map(lambda r: (tf.gather(xs, r % n), tf.gather(ys, r % n)), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


FIT_VARIANTS = [(False, 1), (False, 32), (True, 1), (True, 32)]   # (jit_compile, steps_per_execution)
FASTCORE_MODES = ["auto", "xla", "graph"]


def runners(family: Family, round_seconds: float, fit_variants=FIT_VARIANTS, modes=FASTCORE_MODES,
            jax_seconds: float | None = None) -> list:
    """Every runner of one family, each compiled and sized (data drawn once, seeded); the dots ceiling (Dense-only
    models) runs at the K fastcore's default picked; JAX (`jax_seconds`, a model jax_anchor.py has, its venv
    present) as one more runner."""
    x, y = family.arrays(np.random.default_rng(SEED), family.examples)
    dataset = keras_dataset(x, y, family.batch_size)
    fit = [KerasFit(family, dataset, jit, spe, round_seconds) for jit, spe in fit_variants]
    fast = [Fastcore(family, x, y, mode, round_seconds) for mode in modes]
    keras.utils.set_random_seed(SEED)
    kernels = dense_kernels(family.build())
    default = next((r for r in fast if r.name == "fastcore_auto"), None)
    ceiling = [DotsCeiling(family, x, kernels, default.k, round_seconds)] if kernels and default else []
    jax = [JaxAnchor(family, jax_seconds)] if jax_seconds and family.jax and not jax_missing() else []
    built = fit + fast + ceiling + jax
    # Each runner once more before the rounds: a seed set while building a later one (keras.utils.set_random_seed)
    # clears TensorFlow's function caches, and the next call of every function made before it pays for its
    # instantiation again (a HIGGS graph-mode call: 1,285 ms after a seed reset, 155-200 ms otherwise). The zoo's
    # HIGGS graph runner read 8,387 ex/s in such a first round (about 26k after it, timed alone) and left the race.
    for runner in built:
        runner.warm()
    return built


OUT_OF_RACE = 3.0   # after the first round, a runner this many times slower than its group's fastest stops


def interleave(runners: list, rounds: int, keep: str = "fastcore_auto") -> dict[str, float]:
    """{runner: median examples/s}: one round of each runner in turn, the order rotating every round. A runner
    far behind the fastest of its group (keras_, fastcore_, dots_ or jax_; XLA around convolutions: a round of 32 steps
    took 20 s) keeps its first round's figure, which cannot make it its group's best; `keep` (the gated
    default) runs every round."""
    def group(runner):
        return runner.name.split("_")[0]
    for r in range(rounds):
        fastest = {}
        for runner in runners:
            if runner.rates:
                fastest[group(runner)] = max(fastest.get(group(runner), 0.0), statistics.median(runner.rates))
        for runner in runners[r % len(runners):] + runners[:r % len(runners)]:
            if r == 0 or runner.name == keep or runner.rates[0] * OUT_OF_RACE >= fastest[group(runner)]:
                runner.round()
    return {runner.name: statistics.median(runner.rates) for runner in runners}


def paired(a, b) -> dict:
    """`a`'s figure over `b`'s, round by round over the rounds both ran: {"median", "low", "high", "rounds"}.
    Each pair of figures was taken seconds apart in one round, so a VM whose speed drifts from round to round
    moves both sides of a ratio alike; a ratio of two medians can pair different moments."""
    ratios = [x / y for x, y in zip(a.rates, b.rates)]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios), "rounds": len(ratios)}


def verdict(family: str, ratio: float, floor: float) -> str | None:
    """The gate's one line when fastcore's default fell below its floor against Keras at its best."""
    if ratio < floor:
        return f"REGRESSION zoo {family}: fastcore default / Keras best {ratio:.2f} < floor {floor:.2f}"
    return None


# jax_anchor.py with JAX's CPU async dispatch off: its timed loop (`while elapsed < seconds: call()`) then stops
# at `seconds`; with it on the loop only queues calls, and under load 0.5 s measures ran 7.6 minutes. A K-step
# call takes 20 ms or more, so the per-call dispatch this adds is well under 1%.
_JAX_SYNC = ("import runpy, sys, jax; jax.config.update('jax_cpu_enable_async_dispatch', False); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def jax_missing() -> str | None:
    """Why JAX cannot run here, or None."""
    if not pathlib.Path(JAX_PYTHON).exists():
        return f"no JAX venv at {JAX_PYTHON} (set FASTCORE_JAX_PYTHON)"
    if not JAX_ANCHOR.exists():
        return f"no {JAX_ANCHOR}"
    return None


def jax_anchor(seconds: float) -> dict[str, float]:
    """{model: JAX ex/s, float32} from one run of jax_anchor.py in its own venv (see jax_missing first);
    RuntimeError (its last line) when it fails."""
    done = subprocess.run([JAX_PYTHON, "-c", _JAX_SYNC, str(JAX_ANCHOR), str(seconds)], capture_output=True, text=True,
                          timeout=600)
    found = {m[1]: float(m[2].replace(",", "")) for m in re.finditer(r"^jax (\S+) .* f32: ([\d,]+) ex/s$", done.stdout, re.M)}
    if done.returncode or not found:
        raise RuntimeError(f"jax_anchor.py failed (exit {done.returncode}): "
                           f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return found


class JaxAnchor:
    """JAX + optax on the same model (jax_anchor.py in its own venv) as one more runner of the interleaved
    rounds: each round is one run of the anchor (its best of 3 measures of `seconds`), so a VM whose speed
    drifts hits JAX and fastcore alike. A figure from a single run before or after the rounds compared
    different moments: on one VM it read HIGGS 0.71x where alternating processes read 0.87x."""

    name = "jax_anchor"   # its own interleave group
    compile_seconds = None

    def __init__(self, family: Family, seconds: float):
        self.family, self.seconds = family, seconds
        self.rates: list[float] = []

    def warm(self) -> None:
        """Nothing: each round is a fresh process that compiles before it measures."""

    def round(self) -> None:
        figures = jax_anchor(self.seconds)
        if self.family.jax not in figures:
            raise RuntimeError(f"jax_anchor.py printed no {self.family.jax} line")
        self.rates.append(figures[self.family.jax])


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start
