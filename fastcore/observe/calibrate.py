"""The machine's ceiling per dtype: the best matmul rate it reaches however compiled, measured once, cached.

Utilisation = achieved FLOP/s / ceiling, and a ceiling must be one: the fastest the machine ran the
operation an MLP spends its time in. So for a dtype the ceiling is the best of
  - both compile paths: XLA (`tf.function(jit_compile=True)`, fastcore.layers.matmul: bfloat16 as a
    bf16 x bf16 -> f32 dot) and the plain graph (oneDNN kernels, which use AMX where the CPU has it);
  - two shapes: a large square matmul (`LARGE`^3) and the step's own largest matmul (batch x in x out);
  - several repetitions, all threads (what a run has), in a child process so this process's
    TensorFlow settings and compiled functions stay untouched.
Earlier the peak was one 1024^2 XLA matmul on one thread x threads, and Keras fit reached 108% of it:
a single path and shape is a floor, not a ceiling. A run that still beats the ceiling (a neighbour slowed
the calibration) reports utilisation 100% and says the ceiling was measured low.

Cached in `$FASTCORE_CACHE_DIR/calibration.json` (default `~/.cache/fastcore`) under a key of CPU model,
CPU count and TensorFlow version, one entry per dtype/path/shape. Concurrent runs do not race: a file
lock (fcntl) is held from reading the cache to writing it, so the second run waits and reads what the
first measured. `python -m fastcore.profile calibrate` measures again. The cache and its lock are never
opened through a symbolic link (UsageError), and a cached figure is used only when plausible (finite,
above MIN_GFLOPS, under what the machine's CPUs and GPUs could reach at all): anything else is measured
again. A fresh figure outside those bounds raises Unavailable, so no absurd utilisation is reported.

`peaks()` (per path, the large shape) is what `precision="auto"` compares before it times the model's
own step in both precisions.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time

from fastcore import atomic
from pipelines import rowcache

SIZE = 1024            # the bench's in-run kernel (bench/harness.py); the ceiling uses LARGE
LARGE = 2048           # 2 x 2048^3 = 17 GFLOP per matmul
MIN_STEP_MACS = 1 << 20   # a step matmul smaller than this (sine's 1x10x10) is not worth a measurement
BUDGET_SECONDS = 0.25  # timed repetitions per entry, after one warm-up call that compiles
MIN_REPS = 5
DTYPES = ("float32", "bfloat16", "float16")
PATHS = ("xla", "graph")
MIN_GFLOPS = 0.1                # any CPU of this century multiplies faster
PER_CPU_GFLOPS = 10_000         # ~1.3x an AMX core's bfloat16 peak (1,024 FMA/cycle at ~3.8 GHz)
PER_GPU_GFLOPS = 10_000_000     # ~4x the densest GPU tensor-core rate

Shape = tuple[int, int, int]   # (m, k, n): an [m, k] x [k, n] matmul


def cache_path() -> str:
    """Beside the parsed-data caches: one folder rule ($FASTCORE_CACHE_DIR, else ~/.cache/fastcore)."""
    return os.path.join(rowcache.cache_dir(), "calibration.json")


class Unavailable(RuntimeError):
    """No trustworthy ceiling: the measurement failed or gave a figure the machine cannot reach."""


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
    return f"{cpu_model()} | {os.cpu_count()} cpus | tensorflow {tf.__version__} | ceiling v2"


def threads() -> int:
    """The threads a run's matmuls use: TensorFlow's intra-op setting, else the CPUs this process may use."""
    import tensorflow as tf
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def entry(dtype: str, path: str, shape: Shape) -> str:
    return f"{dtype}/{path}/{shape[0]}x{shape[1]}x{shape[2]}"


def measure(dtype: str, path: str, shape: Shape, budget: float = BUDGET_SECONDS) -> float:
    """Best matmul rate in GFLOP/s for `dtype` compiled on `path` (one compile, then timed repetitions)."""
    import tensorflow as tf
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
    from fastcore.layers import matmul as model_matmul   # the op the models run (bf16 under XLA: f32 accumulation)
    matmul = tf.function(model_matmul, jit_compile=path == "xla")
    m, k, n = shape
    a = tf.cast(tf.random.stateless_uniform([m, k], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_uniform([k, n], seed=[3, 4]), dtype)
    matmul(a, b).numpy()   # trace + compile, and warm the caches
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < MIN_REPS or time.perf_counter() - start < budget:
        t = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * m * k * n / best / 1e9


def highest_plausible_gflops() -> float:
    """A bound no matmul on this machine can pass: its CPUs (and GPUs) at a generous per-device ceiling."""
    import tensorflow as tf
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (os.cpu_count() or 1) * PER_CPU_GFLOPS + gpus * PER_GPU_GFLOPS


def plausible(gflops) -> bool:
    return (isinstance(gflops, (int, float)) and not isinstance(gflops, bool) and math.isfinite(gflops)
            and MIN_GFLOPS <= gflops <= highest_plausible_gflops())


def _measurements(value) -> bool:
    """A stored measurement: a non-empty {name: finite positive number} (a rate or a time)."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value.values())


def _load() -> dict:
    """The cache's contents; missing or unreadable: {} (measure again); a symbolic link: UsageError."""
    try:
        fd = atomic.open_private(cache_path(), "the calibration cache", create=False)
    except OSError:
        return {}
    try:
        with os.fdopen(fd) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked():
    """The cache's lock, held from reading it to writing it; without a writable cache folder, no lock
    (and no cache: the figures are measured, not stored). A symbolic link in its place: UsageError."""
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        fd = atomic.open_private(cache_path() + ".lock", "the calibration cache's lock file")
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save(data: dict) -> None:
    """Rewrite the cache atomically; a read-only or full cache folder costs the cache, never the run."""
    try:
        atomic.write_json(cache_path(), data)
    except OSError:
        pass


def rates(entries: list[tuple[str, str, Shape]], refresh: bool = False,
          measure: bool = True) -> dict[str, tuple[float, bool]]:
    """{entry: (GFLOP/s, from the cache)}; the missing or implausible ones are measured in one child process,
    under the lock. Raises Unavailable when the measurement fails or is itself implausible, or when one is
    missing and `measure` is False (a run stopped by a signal must end promptly)."""
    for dtype, path, _ in entries:
        if dtype not in DTYPES or path not in PATHS:
            raise ValueError(f"no calibration for {dtype}/{path}: dtypes {DTYPES}, paths {PATHS}")
    key = machine_key()
    with _locked():
        data = _load()
        cached = data.get(key, {})
        out = {}
        for dtype, path, shape in entries:
            value = cached.get(entry(dtype, path, shape)) if isinstance(cached, dict) else None
            if isinstance(value, dict) and plausible(value.get("gflops")) and not refresh:
                out[entry(dtype, path, shape)] = (value["gflops"], True)
        missing = [e for e in entries if entry(*e) not in out]
        if missing and not measure:
            raise Unavailable("the machine's peak is not cached and a stopped run does not wait to measure it "
                              "(python -m fastcore.profile calibrate)")
        if missing:
            measured = _measure_in_child(missing)
            wrong = {name: gflops for name, gflops in measured.items() if not plausible(gflops)}
            if wrong:
                raise Unavailable(f"the {', '.join(wrong)} matmul measured {', '.join(f'{g:g}' for g in wrong.values())} "
                                  f"GFLOP/s, outside what {os.cpu_count()} CPUs can reach "
                                  f"({MIN_GFLOPS:g} to {highest_plausible_gflops():,.0f})")
            if not isinstance(data.get(key), dict):
                data[key] = {}
            for name, gflops in measured.items():
                data.setdefault(key, {})[name] = {"gflops": round(gflops, 1), "threads": threads(),
                                                  "measured_by": f"best of {MIN_REPS}+ reps in {BUDGET_SECONDS} s"}
                out[name] = (gflops, False)
            _save(data)
    return out


def _measure_in_child(entries: list[tuple[str, str, Shape]]) -> dict[str, float]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "fastcore.observe.calibrate", *(entry(*e) for e in entries)],
                            capture_output=True, text=True, env=env, timeout=900)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise Unavailable(f"the matmul calibration failed ({last[:200]})")
    return json.loads(lines[-1])


def ceiling(dtype: str, step_shapes: list[Shape] = (), refresh: bool = False, measure: bool = True) -> dict:
    """The dtype's ceiling: the best of both paths on the large shape and the step's largest matmul.

    Returns {"gflops", "path", "shape", "cached", "measured"}: where the best rate came from, and every rate.
    """
    shapes = [(LARGE, LARGE, LARGE)]
    big = [s for s in step_shapes if s[0] * s[1] * s[2] >= MIN_STEP_MACS]
    if big:
        shapes.append(max(big, key=lambda s: s[0] * s[1] * s[2]))
    measured = rates([(dtype, path, shape) for path in PATHS for shape in shapes], refresh, measure)
    best = max(measured, key=lambda name: measured[name][0])
    _, path, shape = best.split("/")
    return {"gflops": round(measured[best][0], 1), "path": path, "shape": shape,
            "cached": all(cached for _, cached in measured.values()),
            "measured": {name: round(gflops, 1) for name, (gflops, _) in measured.items()}}


def peaks(pairs: list[tuple[str, str]], refresh: bool = False) -> dict[str, tuple[float, bool]]:
    """{"dtype/path": (GFLOP/s on the large shape, from the cache)}: what `auto` compares per path."""
    measured = rates([(dtype, path, (LARGE, LARGE, LARGE)) for dtype, path in pairs], refresh)
    return {f"{dtype}/{path}": measured[entry(dtype, path, (LARGE, LARGE, LARGE))] for dtype, path in pairs}


def cached(name: str):
    """The measurements stored under `name` for this machine ({name: finite positive number}), or None
    (never stored, or damaged: measure again)."""
    mine = _load().get(machine_key())
    value = mine.get(name) if isinstance(mine, dict) else None
    return value if _measurements(value) else None


def store(name: str, value) -> None:
    """Store `value` under `name` for this machine (under the lock; atomic rewrite of the cache file)."""
    with _locked():
        data = _load()
        if not isinstance(data.get(machine_key()), dict):
            data[machine_key()] = {}
        data[machine_key()][name] = value
        _save(data)


def _child(args: list[str]) -> int:
    """Runs in the child: prints {entry: GFLOP/s} as the last line of stdout."""
    result = {}
    for name in args:
        dtype, path, shape = name.split("/")
        result[name] = measure(dtype, path, tuple(int(v) for v in shape.split("x")))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
