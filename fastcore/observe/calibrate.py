"""The machine's peak FLOP/s per dtype and compile path, measured once and cached; FLOPs per example.

Utilisation = achieved FLOP/s / peak. "Peak" is not a datasheet figure: it is the best rate this
machine reached on a square matmul (`SIZE` x `SIZE`, the operation an MLP spends its time in),
compiled the same way as the step: `tf.function(jit_compile=True)` for the `xla` path, a plain
`tf.function` for `graph` (oneDNN kernels; eager runs the same kernels, so `eager` maps to `graph`).
The two paths differ a lot for bfloat16 on CPUs with AMX (oneDNN uses it, XLA does not).

Measured single-threaded, in a child process started with TF_NUM_INTRAOP_THREADS=1, and multiplied
by the threads a run uses (the CPUs this process may run on). On a shared machine a multi-threaded
measurement is hostage to the neighbours: back to back, the same 2-core XLA float32 matmul ran 208 and
455 GFLOP/s (another process held one core or did not), while single-threaded it ran 225-238 every
time. A matmul this size scales about linearly over a few cores (455 ~ 2 x 228), so per-thread x
threads is the peak a run can approach when it has the machine to itself.

Measured for one (dtype, path) when a run first needs it (about 3 s, most of it starting TensorFlow
in the child), and cached in `$FASTCORE_CACHE_DIR/calibration.json` (default `~/.cache/fastcore`)
under a key of CPU model, CPU count and TensorFlow version; `python -m fastcore.profile calibrate`
measures again. Best of several repetitions; a busy machine can still lower the figure a little,
and a run sharing its cores with others reaches a lower share of it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from fastcore import atomic
from pipelines import rowcache

SIZE = 1024          # 2 * 1024**3 = 2.1 GFLOP per matmul: ~9 ms on one thread here
BUDGET_SECONDS = 0.3  # timed repetitions per (dtype, path), after one warm-up call that compiles
MIN_REPS = 3
DTYPES = ("float32", "bfloat16", "float16")
PATHS = ("xla", "graph")


def path_of(mode: str) -> str:
    """The compile path whose kernels a step mode runs: eager executes the same ops as a graph."""
    return "xla" if mode == "xla" else "graph"


def cache_path() -> str:
    """Beside the parsed-data caches: one folder rule ($FASTCORE_CACHE_DIR, else ~/.cache/fastcore)."""
    return os.path.join(rowcache.cache_dir(), "calibration.json")


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
    return f"{cpu_model()} | {os.cpu_count()} cpus | tensorflow {tf.__version__} | fastcore.layers.matmul"


def measure(dtype: str, path: str, size: int = SIZE, budget: float = BUDGET_SECONDS) -> float:
    """Best matmul rate in GFLOP/s for `dtype` compiled on `path` (one compile, then timed repetitions)."""
    import tensorflow as tf
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
    from fastcore.layers import matmul as model_matmul   # the op the models run (bf16 under XLA: f32 accumulation)
    matmul = tf.function(model_matmul, jit_compile=path == "xla")
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


def threads() -> int:
    """The threads a run's matmuls use: TensorFlow's intra-op setting, else the CPUs this process may use."""
    import tensorflow as tf
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_per_thread(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """{"dtype/path": single-thread GFLOP/s}, measured in a child process restricted to one thread."""
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [f"{dtype}/{path}" for dtype, path in pairs]
    result = subprocess.run([sys.executable, "-m", "fastcore.observe.calibrate", *args], capture_output=True, text=True,
                            env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"calibration failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_gflops(dtype: str, path: str, refresh: bool = False) -> tuple[float, bool]:
    """(peak GFLOP/s, whether it came from the cache) for this machine, `dtype` and `path`."""
    return peaks([(dtype, path)], refresh)[f"{dtype}/{path}"]


def peaks(pairs: list[tuple[str, str]], refresh: bool = False) -> dict[str, tuple[float, bool]]:
    """{"dtype/path": (peak GFLOP/s, from the cache)}; measures the missing ones in one child process."""
    for dtype, path in pairs:
        if dtype not in DTYPES or path not in PATHS:
            raise ValueError(f"no calibration for {dtype}/{path}: dtypes {DTYPES}, paths {PATHS}")
    key, n = machine_key(), threads()
    cached = _load().get(key, {})
    out = {}
    for dtype, path in pairs:
        entry = cached.get(f"{dtype}/{path}")
        if isinstance(entry, dict) and not refresh:
            out[f"{dtype}/{path}"] = (entry["per_thread_gflops"] * n, True)
    missing = [(d, p) for d, p in pairs if f"{d}/{p}" not in out]
    if missing:
        measured = measure_per_thread(missing)
        data = _load()   # re-read: another run may have added entries meanwhile
        for name, gflops in measured.items():
            data.setdefault(key, {})[name] = {"per_thread_gflops": round(gflops, 1),
                                              "measured_by": f"{SIZE}x{SIZE} matmul, 1 thread, best of {BUDGET_SECONDS} s"}
            out[name] = (gflops * n, False)
        _save(data)
    return out


def cached(name: str):
    """A value stored under `name` for this machine, or None."""
    return _load().get(machine_key(), {}).get(name)


def store(name: str, value) -> None:
    """Store `value` under `name` for this machine (atomic rewrite of the cache file)."""
    data = _load()
    data.setdefault(machine_key(), {})[name] = value
    _save(data)


def _save(data: dict) -> None:
    """Rewrite the cache atomically; a read-only or full cache folder costs the cache, never the run
    (the figures are measured again next time)."""
    try:
        atomic.write_json(cache_path(), data)
    except OSError:
        pass


def _child(args: list[str]) -> int:
    """Runs in the one-thread child: prints {"dtype/path": GFLOP/s} as the last line of stdout."""
    result = {}
    for name in args:
        dtype, path = name.split("/")
        result[name] = measure(dtype, path)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
