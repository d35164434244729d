"""The machine's peak FLOP/s per dtype and compile path, measured once and cached; FLOPs per example.

Utilisation = achieved FLOP/s / peak. "Peak" is not a datasheet figure: it is the best rate this
machine reached on a square matmul (`SIZE` x `SIZE`, the operation an MLP spends its time in),
compiled the same way as the step: `tf.function(jit_compile=True)` for the `xla` path, a plain
`tf.function` for `graph` (oneDNN kernels; eager runs the same kernels, so `eager` maps to `graph`).
The two paths differ a lot for bfloat16 on CPUs with AMX (oneDNN uses it, XLA does not).

Measured for one (dtype, path) at a time, when a run first needs it (about half a second),
and cached in `$FASTCORE_CACHE_DIR/calibration.json` (default `~/.cache/fastcore`) under a key of
CPU model, core count and TensorFlow version; delete the file (or run
`python -m fastcore.profile calibrate`) to measure again. The best of several repetitions is kept,
so a busy machine lowers the figure less; it can still lower it, and utilisation may then exceed 1.
"""
from __future__ import annotations

import json
import os
import platform
import time

from fastcore import atomic

SIZE = 1024          # 2 * 1024**3 = 2.1 GFLOP per matmul: ~10 ms here, long enough to time, short to run
BUDGET_SECONDS = 0.4  # timed repetitions per (dtype, path), after one warm-up call that compiles
MIN_REPS = 3
DTYPES = ("float32", "bfloat16", "float16")
PATHS = ("xla", "graph")


def path_of(mode: str) -> str:
    """The compile path whose kernels a step mode runs: eager executes the same ops as a graph."""
    return "xla" if mode == "xla" else "graph"


def dense_flops_per_example(spec) -> int:
    """Training FLOPs per example of an MLP (fastcore.models.MLPSpec): 6 x the multiply-adds of its dense layers.

    A dense layer with `i` inputs and `o` outputs does i*o multiply-adds per example: 2*i*o FLOPs
    forward, and twice that backward (the gradient with respect to the inputs and to the kernel,
    2*i*o each). Biases, activations, the loss and the optimizer update are O(i + o) per layer and
    left out (under 1% for the built-in models). The first layer's input gradient is counted although
    nothing needs it, as is usual for this estimate.
    """
    sizes = (spec.inputs, *spec.hidden, spec.outputs)
    return 6 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))


def cache_path() -> str:
    root = os.environ.get("FASTCORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastcore")
    return os.path.join(root, "calibration.json")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine_key() -> str:
    import tensorflow as tf
    return f"{cpu_model()} | {os.cpu_count()} cpus | tensorflow {tf.__version__}"


def measure(dtype: str, path: str, size: int = SIZE, budget: float = BUDGET_SECONDS) -> float:
    """Best matmul rate in GFLOP/s for `dtype` compiled on `path` (one compile, then timed repetitions)."""
    import tensorflow as tf
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
    matmul = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=path == "xla")
    a = tf.cast(tf.random.stateless_uniform([size, size], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_uniform([size, size], seed=[3, 4]), dtype)
    matmul(a, b).numpy()   # trace + compile, and warm the caches
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < MIN_REPS or time.perf_counter() - start < budget:
        t = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * size ** 3 / best / 1e9


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}   # missing or unreadable: measure again


def peak_gflops(dtype: str, path: str, refresh: bool = False) -> tuple[float, bool]:
    """(peak GFLOP/s, whether it came from the cache) for this machine, `dtype` and `path`."""
    key, entry = machine_key(), f"{dtype}/{path}"
    data = _load()
    cached = data.get(key, {}).get(entry)
    if cached and not refresh:
        return float(cached), True
    gflops = measure(dtype, path)
    data = _load()   # re-read: another run may have added entries meanwhile
    data.setdefault(key, {})[entry] = round(gflops, 1)
    atomic.write_json(cache_path(), data)
    return gflops, False
